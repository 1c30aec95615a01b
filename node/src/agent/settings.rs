//! `weft router` flags and their environment variables (Weave's names where
//! Weave had one), and how they become a weft-core [`Config`].

use clap::{Args, ValueEnum};
use ipnet::Ipv4Net;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use weft_core::Config;
use weft_core::ipam::{IpamInit, IpamMode};

pub const PORT: u16 = 6783;
/// Longest secret read from --password-file.
pub const MAX_SECRET: u64 = 4096;
/// Smallest MTU of an IPv4 interface (RFC 791; the kernel's ETH_MIN_MTU).
pub const MIN_MTU: u32 = 68;
/// Largest MTU the kernel gives a bridge, veth or VXLAN device.
pub const MAX_MTU: u32 = 65_535;

#[derive(Args, Debug, Clone)]
pub struct RouterArgs {
    /// This node's name as people see it [default: the hostname]
    #[arg(long, env = "WEFT_NAME")]
    pub name: Option<String>,
    /// UDP address the control plane listens on.
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:6783")]
    pub listen: SocketAddr,
    /// Underlay address other peers reach this node on [default: the
    /// --listen address, or the local address that routes to the first peer]
    #[arg(long, env = "WEFT_ADVERTISE_ADDR")]
    pub advertise_addr: Option<IpAddr>,
    /// A peer to connect to (host, IP, or IP:port); repeatable. The
    /// variable takes a space- or comma-separated list.
    #[arg(long = "peer", env = "WEFT_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// The range pod addresses come from.
    #[arg(long, env = "IPALLOC_RANGE", default_value = weft_core::config::DEFAULT_IPALLOC_RANGE)]
    pub ipalloc_range: Ipv4Net,
    /// The cluster's service range (kube-apiserver
    /// --service-cluster-ip-range); the agent refuses a pod range that
    /// overlaps it.
    #[arg(long, env = "WEFT_SERVICE_CIDR")]
    pub service_cidr: Option<Ipv4Net>,
    /// How the address ring is first created: `consensus=N` (seed once N
    /// initial peers agree; plain `consensus` counts --peer addresses plus
    /// this node) or `observer` (never seed; wait for a ring from others).
    #[arg(long, env = "IPALLOC_INIT", default_value = "consensus", value_parser = parse_ipalloc_init)]
    pub ipalloc_init: IpamInit,
    /// Where this node's pod addresses come from: `ring` (a share of
    /// --ipalloc-range, agreed by gossip) or `node-cidr` (exactly this
    /// node's podCIDR: --pod-cidr, else the Node's `spec.podCIDR` with
    /// --kube; allocations wait until it is known).
    #[arg(long, env = "WEFT_IPAM", value_enum, default_value_t = IpamKind::Ring)]
    pub ipam: IpamKind,
    /// This node's podCIDR in `--ipam node-cidr` mode (within
    /// --ipalloc-range); with --kube it comes from the Node.
    #[arg(long, env = "WEFT_POD_CIDR")]
    pub pod_cidr: Option<Ipv4Net>,
    /// Dataplane: `fastdp` (kernel VXLAN), `sleeve` (userspace UDP
    /// tunnel) or `none` (control plane only).
    #[arg(long, env = "WEFT_DATAPATH", value_enum, default_value_t = Datapath::Fastdp)]
    pub datapath: Datapath,
    /// MTU of pod interfaces, 68 up to the underlay MTU minus the
    /// overlay's 50 bytes [default: that most]
    #[arg(long, env = "WEFT_MTU")]
    pub mtu: Option<u32>,
    /// File holding the shared secret that encrypts all traffic, at most
    /// 4 KiB (the WEFT_PASSWORD variable holds the secret itself).
    #[arg(long, env = "WEFT_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Most peers to keep direct connections to (at most 128).
    #[arg(long, env = "CONN_LIMIT", default_value_t = 100)]
    pub conn_limit: usize,
    /// HTTP address of /status, /metrics, /healthz and /readyz.
    #[arg(long, env = "WEFT_STATUS_ADDR", default_value = "127.0.0.1:6784")]
    pub status_addr: SocketAddr,
    /// HTTP address serving only /metrics, /healthz and /readyz, for
    /// Prometheus to scrape (e.g. the node's address, port 6782); the
    /// status pages stay on --status-addr [default: none]
    #[arg(long, env = "WEFT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Where identity, ring and allocations are kept.
    #[arg(long, env = "WEFT_DATA_DIR", default_value = "/var/lib/weft")]
    pub data_dir: PathBuf,
    /// Unix socket of the local API the CNI plugin uses.
    #[arg(long, env = "WEFT_SOCKET", default_value = "/run/weft/weft.sock")]
    pub socket: PathBuf,
    /// Name of the bridge pods attach to.
    #[arg(long, env = "WEFT_BRIDGE", default_value = "weft")]
    pub bridge: String,
    /// Take peers from the Kubernetes API's Nodes, record this node's peer
    /// name, reclaim deleted Nodes' space and set the Node condition
    /// (in-cluster config in a pod, else KUBECONFIG) [default: on inside a
    /// pod, i.e. when KUBERNETES_SERVICE_HOST is set]
    #[arg(long, env = "WEFT_KUBE", num_args = 0..=1, default_missing_value = "true")]
    pub kube: Option<bool>,
    /// This node's Node name in Kubernetes (the DaemonSet passes
    /// spec.nodeName) [default: --name, else the hostname]
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Log lines as `text` or `json` (levels: RUST_LOG, default info).
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--datapath`: an overlay, or none (the control plane alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Datapath {
    Fastdp,
    Sleeve,
    None,
}

impl Datapath {
    /// The overlay it names, if any.
    pub fn overlay(self) -> Option<weft_dataplane::Overlay> {
        match self {
            Datapath::Fastdp => Some(weft_dataplane::Overlay::Fastdp),
            Datapath::Sleeve => Some(weft_dataplane::Overlay::Sleeve),
            Datapath::None => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IpamKind {
    Ring,
    NodeCidr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("--peer {0:?}: not an address or a resolvable host name")]
    Peer(String),
    #[error("cannot read --password-file {file}: {source}")]
    PasswordFile {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--password-file {file} holds more than {MAX_SECRET} bytes: a secret is a line of text; check the file name"
    )]
    PasswordTooLong { file: PathBuf },
    #[error("the password is empty: give a non-empty secret, or none to run unencrypted")]
    EmptyPassword,
    #[error(
        "--mtu {mtu} is outside {MIN_MTU}..={max} ({limit}): pods could not get a working interface; choose an MTU in that range, or leave --mtu out to use {max}"
    )]
    Mtu { mtu: u32, max: u32, limit: String },
    #[error(
        "cannot tell which address other peers reach this node on: --listen is unspecified and there is no --peer to route to; set --advertise-addr"
    )]
    NoAdvertiseAddress,
    // Pods outside the range would be masqueraded, and not routed as pods.
    #[error(
        "podCIDR {pod_cidr} is not inside --ipalloc-range {range}: set --ipalloc-range to the cluster's pod network (kube-controller-manager --cluster-cidr)"
    )]
    PodCidrOutsideRange { pod_cidr: Ipv4Net, range: Ipv4Net },
    #[error("{0}")]
    Config(#[from] weft_core::config::ConfigError),
}

fn parse_ipalloc_init(s: &str) -> Result<IpamInit, String> {
    match s {
        "observer" => Ok(IpamInit::Observer),
        "consensus" => Ok(IpamInit::Consensus(None)),
        _ => {
            let n = s
                .strip_prefix("consensus=")
                .ok_or_else(|| format!("{s:?}: use consensus=N, consensus or observer"))?;
            n.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .map(|n| IpamInit::Consensus(Some(n)))
                .ok_or_else(|| format!("consensus={n}: N must be a positive number of peers"))
        }
    }
}

impl RouterArgs {
    /// The node name: --name, else the Kubernetes Node name (--node-name,
    /// which the DaemonSet sets: a pod on the host network shares the
    /// host's hostname, which need not be the Node's), else the hostname.
    pub fn nickname(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.node_name.clone())
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "weft".to_string())
            })
    }

    /// Whether to use the Kubernetes API: --kube, else inside a pod.
    pub fn use_kube(&self) -> bool {
        self.kube
            .unwrap_or_else(|| std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }

    /// The Node name: --node-name, else the node's name.
    pub fn kube_node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| self.nickname())
    }

    /// Peer addresses, resolved; the port defaults to 6783.
    pub fn peer_addresses(&self) -> Result<Vec<SocketAddr>, SettingsError> {
        let mut out = Vec::new();
        for p in self.peers.iter().flat_map(|p| p.split_whitespace()) {
            let resolved = if let Ok(ip) = p.parse::<IpAddr>() {
                Some(SocketAddr::new(ip, PORT))
            } else if let Ok(sa) = p.parse::<SocketAddr>() {
                Some(sa)
            } else {
                let with_port = if p.contains(':') {
                    p.to_string()
                } else {
                    format!("{p}:{PORT}")
                };
                with_port
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.find(|a| a.is_ipv4()))
            };
            out.push(resolved.ok_or_else(|| SettingsError::Peer(p.to_string()))?);
        }
        Ok(out)
    }

    /// The secret: WEFT_PASSWORD, else the --password-file contents.
    pub fn secret(&self) -> Result<Option<Vec<u8>>, SettingsError> {
        let raw = match (&self.password_file, std::env::var("WEFT_PASSWORD")) {
            (_, Ok(value)) => value,
            (Some(file), Err(_)) => read_secret_file(file)?,
            (None, Err(_)) => return Ok(None),
        };
        // Files usually end with a newline that is not part of the secret.
        let secret = raw.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            return Err(SettingsError::EmptyPassword);
        }
        Ok(Some(secret.as_bytes().to_vec()))
    }

    /// The pod MTU: --mtu, refused when pods could not use it, else the
    /// most the overlay carries. `underlay` is the MTU of the interface
    /// holding the advertised address, when known (1500 is assumed).
    pub fn pod_mtu(&self, underlay: Option<u32>) -> Result<u32, SettingsError> {
        let overlay_max = weft_dataplane::overlay_mtu(underlay.unwrap_or(1500).min(MAX_MTU));
        let Some(mtu) = self.mtu else {
            return Ok(overlay_max);
        };
        let (max, limit) = match (self.datapath, underlay) {
            (Datapath::Fastdp | Datapath::Sleeve, Some(underlay)) => (
                overlay_max,
                format!(
                    "the underlay's MTU {underlay} minus the overlay's {} bytes",
                    weft_dataplane::VXLAN_OVERHEAD
                ),
            ),
            _ => (MAX_MTU, "the kernel's limits".to_string()),
        };
        match (MIN_MTU..=max).contains(&mtu) {
            true => Ok(mtu),
            false => Err(SettingsError::Mtu { mtu, max, limit }),
        }
    }

    /// The address peers reach this node on.
    pub fn advertised(&self, peers: &[SocketAddr]) -> Result<SocketAddr, SettingsError> {
        let port = self.listen.port();
        if let Some(ip) = self.advertise_addr {
            return Ok(SocketAddr::new(ip, port));
        }
        if !self.listen.ip().is_unspecified() {
            return Ok(self.listen);
        }
        // The kernel's choice of source address towards the first peer;
        // connecting a UDP socket sends nothing.
        let local = peers.first().and_then(|peer| {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
            socket.connect(peer).ok()?;
            socket.local_addr().ok()
        });
        local
            .map(|a| SocketAddr::new(a.ip(), port))
            .ok_or(SettingsError::NoAdvertiseAddress)
    }

    /// Whether `cidr` may be this node's podCIDR.
    pub fn check_pod_cidr(&self, cidr: Ipv4Net) -> Result<(), SettingsError> {
        match self.ipalloc_range.contains(&cidr) {
            true => Ok(()),
            false => Err(SettingsError::PodCidrOutsideRange {
                pod_cidr: cidr,
                range: self.ipalloc_range,
            }),
        }
    }

    /// The core configuration these flags describe.
    pub fn core_config(&self, peers: &[SocketAddr]) -> Result<Config, SettingsError> {
        let mut config = Config::new(self.nickname(), self.advertised(peers)?);
        config.conn_limit = self.conn_limit;
        config.secret = self.secret()?;
        config.ipalloc_range = self.ipalloc_range;
        config.ipam = match self.ipam {
            IpamKind::Ring => IpamMode::Ring(self.ipalloc_init),
            IpamKind::NodeCidr => {
                if let Some(cidr) = self.pod_cidr {
                    self.check_pod_cidr(cidr)?;
                }
                IpamMode::NodeCidr(self.pod_cidr)
            }
        };
        config.validate()?;
        Ok(config)
    }
}

/// A secret file's text, read no further than [`MAX_SECRET`] bytes (a
/// device such as /dev/zero never ends).
fn read_secret_file(file: &std::path::Path) -> Result<String, SettingsError> {
    use std::io::Read;
    let cannot = |source| SettingsError::PasswordFile {
        file: file.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_SECRET + 1).read_to_end(&mut bytes))
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_SECRET {
        return Err(SettingsError::PasswordTooLong {
            file: file.to_path_buf(),
        });
    }
    String::from_utf8(bytes)
        .map_err(|e| cannot(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RouterArgs,
    }

    fn parse(argv: &[&str]) -> Result<RouterArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("weft").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn defaults_are_weaves() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.listen, "0.0.0.0:6783".parse().unwrap());
        assert_eq!(a.ipalloc_range, "10.32.0.0/12".parse().unwrap());
        assert_eq!(a.ipalloc_init, IpamInit::Consensus(None));
        assert_eq!(a.datapath, Datapath::Fastdp);
        assert_eq!(a.conn_limit, 100);
        assert_eq!(a.status_addr, "127.0.0.1:6784".parse().unwrap());
        assert_eq!(a.data_dir, PathBuf::from("/var/lib/weft"));
        assert_eq!(a.socket, PathBuf::from("/run/weft/weft.sock"));
        assert_eq!(a.bridge, "weft");
    }

    #[test]
    fn ipalloc_init_takes_consensus_n_and_observer() {
        let a = parse(&["--ipalloc-init", "consensus=3"]).unwrap();
        assert_eq!(a.ipalloc_init, IpamInit::Consensus(Some(3)));
        let a = parse(&["--ipalloc-init", "observer"]).unwrap();
        assert_eq!(a.ipalloc_init, IpamInit::Observer);
        for bad in ["consensus=0", "consensus=x", "seed"] {
            let e = parse(&["--ipalloc-init", bad]).unwrap_err().to_string();
            assert!(e.contains("consensus"), "{bad}: {e}");
        }
    }

    #[test]
    fn peers_take_ips_ports_and_lists() {
        let a = parse(&[
            "--peer",
            "192.168.1.12",
            "--peer",
            "192.168.1.13:7000,127.0.0.1",
        ])
        .unwrap();
        assert_eq!(
            a.peer_addresses().unwrap(),
            vec![
                "192.168.1.12:6783".parse().unwrap(),
                "192.168.1.13:7000".parse().unwrap(),
                "127.0.0.1:6783".parse().unwrap(),
            ]
        );
        let a = parse(&["--peer", "no such host!"]).unwrap();
        assert!(matches!(a.peer_addresses(), Err(SettingsError::Peer(_))));
    }

    #[test]
    fn the_advertised_address_is_explicit_or_routed_towards_a_peer() {
        let a = parse(&["--listen", "127.0.0.1:7100"]).unwrap();
        assert_eq!(
            a.advertised(&[]).unwrap(),
            "127.0.0.1:7100".parse().unwrap()
        );
        let a = parse(&[]).unwrap();
        let peer: SocketAddr = "127.0.0.1:6783".parse().unwrap();
        assert_eq!(
            a.advertised(&[peer]).unwrap(),
            "127.0.0.1:6783".parse().unwrap()
        );
        assert!(matches!(
            a.advertised(&[]),
            Err(SettingsError::NoAdvertiseAddress)
        ));
    }

    #[test]
    fn a_conn_limit_over_the_maximum_is_refused() {
        let a = parse(&["--listen", "127.0.0.1:6783", "--conn-limit", "500"]).unwrap();
        let e = a.core_config(&[]).unwrap_err().to_string();
        assert!(e.contains("500"), "{e}");
    }

    #[test]
    fn node_cidr_mode_takes_a_pod_cidr_inside_the_range() {
        let a = parse(&["--listen", "127.0.0.1:6783", "--ipam", "node-cidr"]).unwrap();
        assert_eq!(a.core_config(&[]).unwrap().ipam, IpamMode::NodeCidr(None));
        let a = parse(&[
            "--listen",
            "127.0.0.1:6783",
            "--ipam",
            "node-cidr",
            "--pod-cidr",
            "10.32.5.0/24",
        ])
        .unwrap();
        let cidr: Ipv4Net = "10.32.5.0/24".parse().unwrap();
        assert_eq!(
            a.core_config(&[]).unwrap().ipam,
            IpamMode::NodeCidr(Some(cidr))
        );
        let a = parse(&[
            "--listen",
            "127.0.0.1:6783",
            "--ipam",
            "node-cidr",
            "--pod-cidr",
            "10.244.5.0/24",
        ])
        .unwrap();
        let e = a.core_config(&[]).unwrap_err().to_string();
        assert!(e.contains("not inside --ipalloc-range 10.32.0.0/12"), "{e}");
    }

    #[test]
    fn an_mtu_outside_the_kernel_and_underlay_limits_is_refused() {
        let a = parse(&["--mtu", "1450"]).unwrap();
        assert_eq!(a.pod_mtu(Some(1500)).unwrap(), 1450);
        for (mtu, underlay, max) in [
            ("0", Some(1500), "68..=1450"),
            ("67", Some(1500), "68..=1450"),
            (
                "1451",
                Some(1500),
                "68..=1450 (the underlay's MTU 1500 minus the overlay's 50 bytes)",
            ),
            ("70000", None, "68..=65535 (the kernel's limits)"),
            ("65536", Some(65536), "68..=65485"),
        ] {
            let a = parse(&["--mtu", mtu]).unwrap();
            let e = a.pod_mtu(underlay).unwrap_err().to_string();
            assert!(e.contains(&format!("--mtu {mtu} is outside {max}")), "{e}");
        }
        for ok in ["68", "100", "8950"] {
            let a = parse(&["--mtu", ok]).unwrap();
            assert_eq!(a.pod_mtu(Some(9000)).unwrap().to_string(), ok);
        }
        // Without a dataplane only the kernel's limits apply.
        let a = parse(&["--mtu", "9000", "--datapath", "none"]).unwrap();
        assert_eq!(a.pod_mtu(Some(1500)).unwrap(), 9000);
        // The default is the most the overlay carries.
        assert_eq!(parse(&[]).unwrap().pod_mtu(Some(9001)).unwrap(), 8951);
        assert_eq!(parse(&[]).unwrap().pod_mtu(None).unwrap(), 1450);
    }

    #[test]
    fn a_password_file_is_read_up_to_4_kib() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read_secret_file(&file).unwrap(), "s3cret\n");
        std::fs::write(&file, vec![b'x'; 4096]).unwrap();
        assert_eq!(read_secret_file(&file).unwrap().len(), 4096);
        std::fs::write(&file, vec![b'x'; 4097]).unwrap();
        let e = read_secret_file(&file).unwrap_err().to_string();
        assert!(e.contains("holds more than 4096 bytes"), "{e}");
        // A device that never ends is refused, not read forever.
        let e = read_secret_file(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(e, SettingsError::PasswordTooLong { .. }), "{e}");
    }
}
