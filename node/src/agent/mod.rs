//! `weft router`: the agent. Loads the node's state, starts the driver
//! loop over a UDP socket, serves the local API and the status server,
//! and starts the data path, which follows the router's published views.
//! The driver loop owns the router; nothing else here mutates it.

pub mod kubernetes;
pub mod settings;
pub mod store;

use crate::serve::api::{self, Api};
use crate::serve::http::{self, Scope, StatusServer};
use crate::serve::metrics::Metrics;
use settings::{Datapath, IpamKind, RouterArgs};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use store::{Store, StoreError};
use tokio::sync::{mpsc, watch};
use weft_core::ipam::IpamInit;
use weft_core::{Event, PersistedState, Router, Time};
use weft_dataplane::Overlay;
use weft_dataplane::desired::Setup;
use weft_dataplane::port::{self, ControlSocket};
use weft_dataplane::probe::{self, Prober};
use weft_dataplane::sleeve::{Sleeve, Tun};
use weft_dataplane::status::DataplaneState;
use weft_dataplane::sync::{Follow, KernelSync};
use weft_driver::{Datagrams, Driver, Host};

/// Why the agent did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the router: {0}")]
    Router(weft_core::ConfigError),
    #[error("cannot listen on UDP {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot serve the local API on {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot serve {what} on {addr}: {source}")]
    Status {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read 32 random bytes from /dev/urandom: {0}")]
    Random(io::Error),
    #[error(transparent)]
    Driver(#[from] weft_driver::DriverError),
    #[error("--kube: {0} (run without --kube, or give a KUBECONFIG)")]
    Kube(weft_kube::Error),
    #[error(
        "the pod range {range} collides with this node's network: {collisions}; choose another --ipalloc-range (IPALLOC_RANGE) that overlaps no node network, route or service range"
    )]
    RangeCollides {
        range: ipnet::Ipv4Net,
        collisions: String,
    },
    #[error(
        "cannot program the kernel dataplane: {0} (use --datapath none to run the control plane alone)"
    )]
    Dataplane(weft_dataplane::DataplaneError),
}

/// The driver loop's surroundings on a real node.
struct AgentHost {
    store: Store,
    /// Shared with the local API, which refuses requests while set.
    save_trouble: api::SaveTroubleCell,
}

impl Host for AgentHost {
    fn persist(&mut self, state: &PersistedState) -> io::Result<()> {
        self.store.save(state).map_err(io::Error::other)
    }

    fn save_trouble(&mut self, trouble: Option<&weft_driver::SaveTrouble>) {
        match trouble {
            Some(t) => tracing::warn!("{t}"),
            None => tracing::info!("the node's state is saved again"),
        }
        *self.save_trouble.lock().unwrap_or_else(|p| p.into_inner()) = trouble.cloned();
    }

    fn event(&mut self, _now: Time, event: &Event) {
        log_event(event);
    }

    fn socket_error(&mut self, error: &io::Error) {
        tracing::debug!("UDP socket: {error}");
    }
}

fn log_event(event: &Event) {
    match event {
        Event::ConnectionUp { peer, address } => {
            tracing::info!(%peer, %address, "connection established")
        }
        Event::ConnectionDown { peer } => tracing::info!(%peer, "connection lost"),
        Event::PeerDiscovered { peer, nickname } => {
            tracing::info!(%peer, %nickname, "peer discovered")
        }
        Event::PeerForgotten { peer } => tracing::info!(%peer, "peer forgotten"),
        Event::Ipam(e) => tracing::info!("ipam: {e:?}"),
        other => tracing::debug!("{other:?}"),
    }
}

/// Takes the hard limit on open files as the soft one: local clients'
/// connections must not leave the agent unable to open its state file
/// (the servers cap their connections too).
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let raised = getrlimit(Resource::RLIMIT_NOFILE).and_then(|(soft, hard)| match soft < hard {
        true => setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map(|()| hard),
        false => Ok(soft),
    });
    match raised {
        Ok(limit) => tracing::debug!("open file limit: {limit}"),
        Err(e) => tracing::warn!("cannot raise the open file limit: {e}"),
    }
}

/// The local API's socket file, removed when the agent stops, also when
/// its start fails after the socket was bound.
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn os_seed() -> Result<[u8; 32], StartError> {
    use std::io::Read;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(StartError::Random)?;
    Ok(seed)
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: RouterArgs) -> Result<(), StartError> {
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError::Listen {
            addr: args.listen,
            source: e,
        })?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, run_async(args))
}

async fn run_async(mut args: RouterArgs) -> Result<(), StartError> {
    let mut peers = args.peer_addresses()?;
    let kube = match args.use_kube() {
        true => Some(kubernetes::connect().await.map_err(StartError::Kube)?),
        false => None,
    };
    if let Some(nodes) = kube.as_ref().and_then(|k| k.nodes.as_ref()) {
        adopt_nodes(&mut args, &mut peers, nodes);
    }
    check_range(&args)?;
    let mut config = args.core_config(&peers)?;
    // Orders this start's seal epoch after every earlier one, whatever
    // state file is on disk; a clock before 1970 counts as 1970.
    config.start_clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let config_address = config.address;
    let mtu = args.pod_mtu(underlay_mtu(&config_address))?;
    peers.retain(|p| *p != config_address);
    let store = Store::open(&args.data_dir)?;
    let saved = store.load()?;
    let restored = saved.is_some();
    let epoch = tokio::time::Instant::now();
    let mut router = Router::new(config, saved, os_seed()?, Time::ZERO).map_err(|e| match e {
        // The file is at fault, not the flags: say which file, as for a
        // file that does not parse.
        weft_core::ConfigError::InvalidState(reason) => StartError::Store(StoreError::Corrupt {
            file: store.state_file(),
            reason: reason.to_string(),
        }),
        other => StartError::Router(other),
    })?;
    for peer in &peers {
        router.add_peer_address(Time::ZERO, *peer);
    }
    tracing::info!(
        name = %router.name(),
        restored,
        peers = peers.len(),
        "weft {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let listen_error = |source| StartError::Listen {
        addr: args.listen,
        source,
    };
    // UDP 6783. With a sleeve, its receive thread reads the port, and
    // the kernel steers control datagrams to the driver loop's own socket
    // (`weft_dataplane::port` says how).
    let tun = open_tun(&args);
    let port = port::bind(args.listen, tun.is_some()).map_err(listen_error)?;
    let prober = (args.datapath == Datapath::Fastdp).then(|| {
        let nonce_seed = os_seed().map_or(0, |s| {
            u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
        });
        Arc::new(Prober::new(
            router.name(),
            epoch.into_std(),
            nonce_seed,
            true,
        ))
    });
    let probe_socket = port.main.try_clone().map_err(listen_error)?;
    let me = router.name();
    let (views_tx, views) = watch::channel(Arc::new(router.view()));
    let core_config = router.config().clone();
    let (handed, sleeve_counters) = match tun {
        Some(tun) => {
            let sleeve = Sleeve::new(
                tun,
                port.main.try_clone().map_err(listen_error)?,
                views.clone(),
                &core_config,
                args.secret().ok().flatten().as_deref(),
                max_datagram(&core_config.address),
                prober.clone(),
            );
            let counters = sleeve.counters.clone();
            (Some(sleeve.start()), Some(counters))
        }
        None => (None, None),
    };
    let sleeve = handed.is_some();
    if let Some(prober) = &prober {
        prober.set_sleeve(sleeve);
    }
    let socket = ControlSocket::new(port, handed, prober.clone()).map_err(listen_error)?;
    let socket = AgentSocket(socket);
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let setup = Setup {
        bridge: args.bridge.clone(),
        mtu,
        overlay: args.datapath.overlay().unwrap_or_default(),
        sleeve_fallback: sleeve && args.datapath == Datapath::Fastdp,
    };
    let follow = Follow {
        views: views.clone(),
        setup,
        prober: prober.clone(),
    };
    let (dataplane, kernel) = start_dataplane(&args, follow)?;
    let save_trouble = api::SaveTroubleCell::default();
    let api = Api {
        commands: commands.clone(),
        views: views.clone(),
        bridge: args.bridge.clone(),
        mtu,
        dataplane: dataplane.clone(),
        kernel: kernel.clone(),
        save_trouble: save_trouble.clone(),
    };
    let listener = api::bind(&args.socket).map_err(|source| StartError::Socket {
        path: args.socket.clone(),
        source,
    })?;
    let _socket_file = SocketFile(args.socket.clone());
    let status_listener = tokio::net::TcpListener::bind(args.status_addr)
        .await
        .map_err(|source| StartError::Status {
            what: "status",
            addr: args.status_addr,
            source,
        })?;
    let metrics_listener = match args.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Status {
                    what: "metrics",
                    addr,
                    source,
                })?,
        ),
        None => None,
    };
    let server = StatusServer {
        api: api.clone(),
        metrics: Rc::new(Metrics::default()),
        dataplane: dataplane.clone(),
        prober: prober.clone(),
        sleeve: sleeve_counters,
    };
    let ready_api = api.clone();
    tokio::task::spawn_local(api::serve(listener, api));
    if let Some(listener) = metrics_listener {
        tokio::task::spawn_local(http::serve(listener, server.clone(), Scope::Metrics));
    }
    tokio::task::spawn_local(http::serve(status_listener, server, Scope::Status));
    if let Some(prober) = prober {
        // Not after a node-wide fallback: no VXLAN device, nothing to probe.
        let state = dataplane.clone();
        let fastdp_up = move || state.borrow().fallback.is_none();
        tokio::task::spawn_local(probe::run(prober, views, probe_socket, fastdp_up));
    }
    if let Some(kube) = kube {
        let agent = kubernetes::Agent {
            node_name: args.kube_node_name(),
            pod_cidr: (args.ipam == IpamKind::NodeCidr).then_some(kubernetes::PodCidr {
                current: args.pod_cidr,
                range: args.ipalloc_range,
            }),
            me,
            own_address: config_address.ip(),
            port: args.listen.port(),
            commands: commands.clone(),
            ready: Box::new(move || {
                let api = ready_api.clone();
                Box::pin(async move { api.status().await.ready })
            }),
        };
        kubernetes::spawn(kube, agent);
    }
    let host = AgentHost {
        store,
        save_trouble,
    };
    let driver = Driver::new(router, socket, host, epoch).publish_views(views_tx);
    let result = tokio::select! {
        r = driver.run(commands_rx) => r.map_err(StartError::from),
        () = stop_signal() => {
            tracing::info!("stopping; state is saved, and the kernel dataplane stays up");
            Ok(())
        }
    };
    drop(commands);
    result
}

/// Takes the Node list's view of the cluster: every Node's address is a
/// peer, this node's own Node gives the advertised address, and the Node
/// count is the quorum for seeding (unless flags say otherwise).
fn adopt_nodes(
    args: &mut RouterArgs,
    peers: &mut Vec<std::net::SocketAddr>,
    nodes: &weft_kube::NodeList,
) {
    let own = args.kube_node_name();
    if args.advertise_addr.is_none() && args.listen.ip().is_unspecified() {
        args.advertise_addr = nodes
            .peers
            .iter()
            .find(|p| p.node_name == own)
            .map(|p| p.addr);
    }
    if args.ipalloc_init == IpamInit::Consensus(None) {
        args.ipalloc_init = IpamInit::Consensus(Some(nodes.node_names.len().max(1)));
    }
    if args.ipam == IpamKind::NodeCidr && args.pod_cidr.is_none() {
        args.pod_cidr = kubernetes::own_pod_cidr(&nodes.peers, &own);
    }
    let port = args.listen.port();
    for p in nodes.peers.iter().filter(|p| p.node_name != own) {
        let address = std::net::SocketAddr::new(p.addr, port);
        if !peers.contains(&address) {
            peers.push(address);
        }
    }
}

/// Refuses a pod range that overlaps the service range or, when weft
/// programs the kernel, the node's own networks and routes: pods there
/// would be unreachable or hijack the node's traffic.
fn check_range(args: &RouterArgs) -> Result<(), StartError> {
    let (interfaces, routes) = match args.datapath {
        Datapath::None => (Default::default(), Vec::new()),
        _ => (
            weft_dataplane::underlay::interfaces(),
            weft_dataplane::underlay::routes(),
        ),
    };
    let ours = [
        args.bridge.as_str(),
        weft_dataplane::VXLAN_NAME,
        weft_dataplane::names::SLEEVE_DEVICE,
    ];
    let found = weft_dataplane::underlay::collisions(
        args.ipalloc_range,
        interfaces.values(),
        &routes,
        args.service_cidr,
        &ours,
    );
    if found.is_empty() {
        return Ok(());
    }
    let collisions = found.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    Err(StartError::RangeCollides {
        range: args.ipalloc_range,
        collisions: collisions.join("; "),
    })
}

/// The MTU of the interface holding the advertised address, if found.
fn underlay_mtu(address: &std::net::SocketAddr) -> Option<u32> {
    match address.ip() {
        std::net::IpAddr::V4(ip) => weft_dataplane::underlay::mtu_holding(ip),
        std::net::IpAddr::V6(_) => None,
    }
}

/// The driver loop's side of UDP 6783.
struct AgentSocket(ControlSocket);

impl Datagrams for AgentSocket {
    async fn send_to(&self, payload: &[u8], to: std::net::SocketAddr) -> io::Result<usize> {
        self.0.send_to(payload, to).await
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, std::net::SocketAddr)> {
        self.0.recv_from(buf).await
    }
}

/// The sleeve's TUN device, for `--datapath sleeve` and as fastdp's
/// fallback; `None` without a dataplane or without TUN support.
fn open_tun(args: &RouterArgs) -> Option<Tun> {
    if args.datapath == Datapath::None {
        return None;
    }
    let device = weft_dataplane::names::SLEEVE_DEVICE;
    Tun::create(device)
        .inspect_err(|e| tracing::warn!("no sleeve: cannot create TUN device {device}: {e}"))
        .ok()
}

/// The largest UDP payload the underlay carries unfragmented: its MTU
/// (1500 when unknown) less the outer IP and UDP headers.
fn max_datagram(underlay: &std::net::SocketAddr) -> usize {
    let (mtu, headers) = match underlay.ip() {
        std::net::IpAddr::V4(ip) => (weft_dataplane::underlay::mtu_holding(ip), 28),
        std::net::IpAddr::V6(_) => (None, 48),
    };
    (mtu.unwrap_or(1500).min(65_535) as usize).saturating_sub(headers)
}

/// The dataplane asked for, or why it cannot be had: what it reports,
/// and its kernel thread, which follows `follow`.
fn start_dataplane(
    args: &RouterArgs,
    follow: Follow,
) -> Result<(watch::Receiver<DataplaneState>, Option<KernelSync>), StartError> {
    let requested = args.datapath.overlay().map_or("none", Overlay::name);
    let mut state = DataplaneState::new(requested);
    if args.datapath == Datapath::None {
        return Ok((watch::channel(state).1, None));
    }
    let linux = weft_dataplane::LinuxDataplane::new().map_err(StartError::Dataplane)?;
    if let Err(why) = weft_dataplane::nftables::install_masquerade(args.ipalloc_range) {
        tracing::warn!("pods cannot reach addresses outside the cluster: {why}");
        state.egress_problem = Some(why.to_string());
    }
    if !weft_dataplane::sysctl::bridge_netfilter_loaded() {
        tracing::warn!(
            "{}; load it with `modprobe br_netfilter`",
            weft_dataplane::sysctl::WITHOUT_BRIDGE_NETFILTER
        );
    }
    let kernel = KernelSync::start(Box::new(linux), state, follow);
    Ok((kernel.status(), Some(kernel)))
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
