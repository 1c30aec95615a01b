//! The local API on the agent's Unix socket (owner only), for the CNI
//! plugin: one JSON request per line, one JSON reply per line, in the
//! wire format of [`weft_api::socket`]. Lines are at most [`MAX_REQUEST`]
//! bytes; a connection idle for [`IDLE_TIMEOUT`] is closed; at most
//! [`MAX_CONNECTIONS`] are held at once.

use crate::serve::limit::{Admitted, ConnectionLimit};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use weft_api::{Answer, ApiError, Attachment, ErrorKind, NodeStatus, Reply, Request};
use weft_core::{Router, Time, View};
use weft_driver::Command;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a connection may wait between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections held at once: room for a CNI call per pod of a full node
/// (kubelet's default is 110 pods), twice over.
pub const MAX_CONNECTIONS: usize = 256;
/// How long an allocation waits for space unless the request says.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
const MAX_WAIT: Duration = Duration::from_secs(120);

/// What the API needs of the agent.
#[derive(Clone)]
pub struct Api {
    /// The driver loop, which owns the router: requests, and questions
    /// about the router ([`weft_driver::read`]).
    pub commands: mpsc::UnboundedSender<Command>,
    /// The router's views, as the driver loop publishes them.
    pub views: watch::Receiver<Arc<View>>,
    pub bridge: String,
    pub mtu: u32,
    /// The kernel thread, when this agent programs the kernel.
    pub kernel: Option<weft_dataplane::sync::KernelSync>,
    /// Which dataplane carries pods, and its problems.
    pub dataplane: tokio::sync::watch::Receiver<weft_dataplane::status::DataplaneState>,
    /// Set while the node's state cannot be saved (the driver loop's host
    /// writes it).
    pub save_trouble: SaveTroubleCell,
}

/// Why saves fail right now, if they do.
pub type SaveTroubleCell = std::sync::Arc<std::sync::Mutex<Option<weft_driver::SaveTrouble>>>;

/// Binds the socket: replaces a stale socket file; created under umask
/// 0077, so it is never open to other users, not even for a moment.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use nix::sys::stat::{Mode, umask};
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
    // The umask is the process's: other threads creating files meanwhile
    // get 0077 too, which is never less safe.
    let previous = umask(Mode::from_bits_truncate(0o077));
    let listener = UnixListener::bind(path);
    umask(previous);
    listener
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, api: Api) {
    let limit = ConnectionLimit::new(MAX_CONNECTIONS);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let api = api.clone();
                // Turned away: dropping the stream closes it.
                limit.spawn(|admitted| connection(stream, api, admitted));
            }
            Err(e) => {
                tracing::warn!("local API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, api: Api, admitted: Admitted) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        admitted.idle();
        // The bound is per line: a connection may carry any number.
        let mut limited = (&mut lines).take(MAX_REQUEST as u64 + 1);
        let read = tokio::time::timeout(IDLE_TIMEOUT, limited.read_line(&mut line)).await;
        admitted.busy();
        let answer = match read {
            Err(_) | Ok(Ok(0)) => return,
            Ok(Ok(_)) if !line.ends_with('\n') && line.len() > MAX_REQUEST => {
                Err(bad(format!("request longer than {MAX_REQUEST} bytes")))
            }
            Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
                Ok(request) => api.handle(request).await,
                Err(e) => Err(bad(format!("not a valid request: {e}"))),
            },
            Ok(Err(e)) => Err(bad(format!("unreadable request: {e}"))),
        };
        let reply = Reply::from(answer);
        let text = reply.to_line();
        let sent = tokio::time::timeout(IDLE_TIMEOUT, write.write_all(text.as_bytes())).await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        if matches!(&reply, Reply::Error(e) if e.kind == ErrorKind::BadRequest) {
            return;
        }
    }
}

use tokio::io::AsyncReadExt;

/// The pods' allocations on this node, by container (the gateway's own
/// entry left out).
fn allocations(router: &Router) -> Vec<(String, Ipv4Addr)> {
    let held = router.ipam().allocations().iter();
    held.filter(|(id, _)| *id != weft_core::ipam::space::GATEWAY_ID)
        .map(|(id, address)| (id.to_string(), address))
        .collect()
}

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

fn refused_because(message: String) -> ApiError {
    ApiError {
        kind: ErrorKind::Refused,
        message,
    }
}

impl Api {
    pub async fn handle(&self, request: Request) -> Result<Answer, ApiError> {
        if let Some(id) = request.container_id() {
            check_not_reserved(id)?;
        }
        if request.saves()
            && let Some(trouble) = self.save_trouble()
        {
            return Err(unavailable_because(&trouble));
        }
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
                match answer.await.map_err(|_| self.unavailable())? {
                    Ok(released) => Ok(Answer::Released { released }),
                    Err(e) => Err(refused(e)),
                }
            }
            Request::Check { container_id } => {
                let id = container_id.clone();
                let held = self
                    .read(move |router, _| router.ipam().allocations().get(&id))
                    .await?;
                match held {
                    Some(address) => Ok(Answer::Attachment(self.attachment(container_id, address))),
                    None => Err(refused_because(format!(
                        "container {container_id} holds no address on this node"
                    ))),
                }
            }
            Request::List {} => {
                let held = self.read(|router, _| allocations(router)).await?;
                let allocations = held
                    .into_iter()
                    .map(|(id, a)| self.attachment(id, a))
                    .collect();
                Ok(Answer::List { allocations })
            }
            Request::Status {} => Ok(Answer::Status(self.status().await)),
            Request::DeleteVeth { interface } => {
                let valid = interface.starts_with("vethwf")
                    && interface.len() <= 15
                    && interface.chars().all(|c| c.is_ascii_alphanumeric());
                if !valid {
                    return Err(refused_because(format!(
                        "{interface:?} is not a weft pod veth"
                    )));
                }
                match &self.kernel {
                    Some(k) if k.delete_device(interface) => Ok(Answer::Accepted {}),
                    _ => Err(refused_because(
                        "this agent does not program the kernel".into(),
                    )),
                }
            }
            Request::RemovePeer { peer } => {
                let name = self.peer_named(&peer).await?;
                let (reply, answer) = oneshot::channel();
                self.send(Command::RemovePeer { peer: name, reply })?;
                match answer.await.map_err(|_| self.unavailable())? {
                    Ok(reclaimed) => Ok(Answer::Reclaimed { reclaimed }),
                    Err(e) => Err(refused(e)),
                }
            }
        }
    }

    /// A value computed from the router on the driver loop.
    pub async fn read<T: Send + 'static>(
        &self,
        question: impl FnOnce(&Router, Time) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        weft_driver::read(&self.commands, question)
            .await
            .ok_or_else(|| self.unavailable())
    }

    /// A peer this node has heard of, by its name, or by its nickname
    /// when that is unambiguous.
    async fn peer_named(&self, peer: &str) -> Result<weft_core::PeerName, ApiError> {
        use crate::serve::known_peers::{find, known_peers};
        let known = self.read(known_peers).await?;
        find(peer, &known).map_err(refused_because)
    }

    fn send(&self, command: Command) -> Result<(), ApiError> {
        self.commands.send(command).map_err(|_| self.unavailable())
    }

    fn save_trouble(&self) -> Option<weft_driver::SaveTrouble> {
        self.save_trouble
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why a request went unanswered by the driver loop.
    fn unavailable(&self) -> ApiError {
        match self.save_trouble() {
            Some(trouble) => unavailable_because(&trouble),
            None => ApiError {
                kind: ErrorKind::Unavailable,
                message: "the weft agent is stopping".into(),
            },
        }
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
            Ok(Err(_)) => return Err(self.unavailable()),
            Err(_) => {
                return Err(pending(format!(
                    "no address for {container} yet: {}",
                    self.pending_reason(&container).await
                )));
            }
        };
        if let Some(kernel) = &self.kernel {
            let gateway = || self.views.borrow().gateway;
            if tokio::time::timeout_at(deadline, kernel.bridge_ready(gateway))
                .await
                .is_err()
            {
                let reason = self.status().await.reason;
                let reason = reason.unwrap_or_else(|| "it was just set up".into());
                return Err(pending(format!(
                    "{container} holds {address}, but the bridge {} is not ready for pods yet: {reason}",
                    self.bridge
                )));
            }
        }
        Ok(Answer::Attachment(self.attachment(container, address)))
    }

    async fn pending_reason(&self, container: &str) -> String {
        let container = container.to_string();
        let reason = self.read(move |router, now| {
            let status = router.status(now);
            let pending = status.ipam.pending.into_iter();
            pending
                .filter(|p| p.container == container)
                .map(|p| p.reason)
                .next()
        });
        reason
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| "the request is still being processed".into())
    }

    /// `address` as a pod wears it, from the newest view (published before
    /// the answer that handed the address out).
    fn attachment(&self, container_id: String, address: Ipv4Addr) -> Attachment {
        let view = self.views.borrow();
        Attachment {
            container_id,
            address: Ipv4Net::new(address, view.range.prefix_len())
                .expect("prefix of a valid range"),
            gateway: view.gateway,
        }
    }

    /// Whether the agent can wire pods now, and why not.
    pub async fn status(&self) -> NodeStatus {
        let ipam = self.read(|router, now| router.status(now).ipam).await;
        let (gateway, range) = {
            let view = self.views.borrow();
            (view.gateway, view.range)
        };
        let problem = self.dataplane.borrow().kernel_error.clone();
        let reason = if let Some(trouble) = self.save_trouble() {
            Some(trouble.to_string())
        } else if let Some(p) = problem {
            Some(p)
        } else if ipam.is_err() {
            Some("the weft agent is stopping".into())
        } else if ipam
            .as_ref()
            .is_ok_and(|i| !i.seeded && i.mode != "node-cidr")
        {
            Some(
                "the IPAM ring is not seeded yet: waiting for a quorum of peers (see `weft status ipam`)"
                    .into(),
            )
        } else if let Some(gateway) = gateway {
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
            range,
            gateway,
        }
    }
}

/// Container IDs the agent uses for itself (the bridge gateway's address)
/// are never a pod's: releasing one would take the node's gateway away.
fn check_not_reserved(container_id: &str) -> Result<(), ApiError> {
    match container_id.starts_with(RESERVED_PREFIX) {
        true => Err(refused_because(format!(
            "container ID {container_id:?} is reserved for the agent's own addresses (IDs starting with {RESERVED_PREFIX:?} are not pods')"
        ))),
        false => Ok(()),
    }
}

/// The agent's own allocations are named `weft:...` (see
/// weft_core::ipam::space::GATEWAY_ID); pod IDs never hold a colon.
const RESERVED_PREFIX: &str = "weft:";

fn unavailable_because(trouble: &weft_driver::SaveTrouble) -> ApiError {
    ApiError {
        kind: ErrorKind::Unavailable,
        message: format!("{trouble}; try again"),
    }
}

fn refused(e: weft_core::ipam::IpamError) -> ApiError {
    refused_because(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::watch;
    use weft_core::View;
    use weft_dataplane::Overlay;
    use weft_dataplane::desired::Setup;
    use weft_dataplane::status::DataplaneState;
    use weft_dataplane::sync::{Follow, KernelSync};

    /// An agent API over a node-cidr router that has its space, with a
    /// kernel thread over an in-memory dataplane that has applied nothing
    /// yet (the view it follows shows no space), and a stand-in driver
    /// that answers every allocation with .5. Publish the router's view on
    /// the sender to move the kernel.
    fn agent_with_space() -> (Api, watch::Sender<Arc<View>>) {
        use weft_core::ipam::IpamMode;
        let mut config = weft_core::Config::new("node1", ([192, 168, 1, 11], 6783).into());
        config.ipam = IpamMode::NodeCidr(Some("10.32.1.0/24".parse().unwrap()));
        let mut router = weft_core::Router::new(config, None, [1; 32], weft_core::Time::ZERO)
            .expect("a valid configuration");
        router.handle_timeout(weft_core::Time::ZERO);
        assert!(router.gateway().is_some(), "the node has its space");
        let before_space = View {
            gateway: None,
            ..router.view()
        };
        let view = Arc::new(router.view());
        let (kernel_views, followed) = watch::channel(Arc::new(before_space));
        let follow = Follow {
            views: followed,
            setup: Setup {
                bridge: "weft".into(),
                mtu: 1400,
                overlay: Overlay::Sleeve,
                sleeve_fallback: false,
            },
            prober: None,
        };
        let kernel = KernelSync::start(
            Box::new(weft_dataplane::MemoryDataplane::new()),
            DataplaneState::new("sleeve"),
            follow,
        );
        let (commands, mut driver) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(command) = driver.recv().await {
                match command {
                    Command::Allocate { reply, .. } => {
                        let _ = reply.send(Ok(Ipv4Addr::new(10, 32, 1, 5)));
                    }
                    Command::Read(read) => read.answer(&router, weft_core::Time::ZERO),
                    _ => {}
                }
            }
        });
        let api = Api {
            commands,
            views: watch::channel(view).1,
            bridge: "weft".into(),
            mtu: 1400,
            dataplane: kernel.status(),
            kernel: Some(kernel),
            save_trouble: Default::default(),
        };
        (api, kernel_views)
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
            let (api, views) = agent_with_space();
            let status = api.status().await;
            assert!(!status.ready, "{status:?}");
            assert!(status.reason.unwrap().contains("bridge weft"));
            let early = api.handle(allocate("c1", 50)).await.unwrap_err();
            assert_eq!(early.kind, ErrorKind::Pending, "{early:?}");
            assert!(early.message.contains("10.32.1.5"), "{early:?}");

            let kernel = api.kernel.clone().unwrap();
            views.send_replace(api.views.borrow().clone());
            let Ok(Answer::Attachment(a)) = api.handle(allocate("c1", 60_000)).await else {
                panic!("an address once the bridge is up");
            };
            assert_eq!(a.address.addr(), Ipv4Addr::new(10, 32, 1, 5));
            assert!(a.gateway.is_some_and(|g| kernel.bridge_holds(g)));
            assert!(api.status().await.ready);
        });
    }
}
