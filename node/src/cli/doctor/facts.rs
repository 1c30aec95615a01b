//! What `weft doctor` looks at: the agent's status API and local socket,
//! and the node's interfaces, routes, sysctls and CNI files. Gathering
//! only; the verdicts are in `checks`.

use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;
use weft_api::NodeStatus;
use weft_api::status::{
    ConnectionStatus, DropReason, IpamStatus, LinkState, PeerStatus, TargetStatus,
};
use weft_core::PeerName;
use weft_dataplane::status::DataplaneState;
use weft_dataplane::underlay::{Collision, Interface, Route};

/// Everything the checks need, gathered once.
pub struct Facts {
    pub status_addr: SocketAddr,
    pub socket: PathBuf,
    pub agent: Result<Agent, String>,
    pub node: Result<NodeStatus, String>,
    pub interfaces: BTreeMap<String, Interface>,
    pub routes: Vec<Route>,
    pub forwarding: Option<bool>,
    pub bridge_netfilter: BridgeNetfilter,
    pub cni_conf_dir: PathBuf,
    pub cni_configs: Result<Vec<CniConfig>, String>,
    pub cni_bin_dir: PathBuf,
    /// `weft-cni --version`'s version, or why there is none.
    pub cni_plugin: Result<String, String>,
    pub service_cidr: Option<Ipv4Net>,
    /// Port probes of the peers not connected directly.
    pub probes: Vec<Probe>,
}

impl Facts {
    /// The interface holding the agent's advertised address.
    pub fn underlay_device(&self) -> Option<&Interface> {
        let IpAddr::V4(ip) = self.agent.as_ref().ok()?.me_address()?.ip() else {
            return None;
        };
        self.interfaces
            .values()
            .find(|i| i.addrs.iter().any(|a| a.addr() == ip))
    }

    /// What of the node's network collides with the pod range.
    pub fn collisions(&self, node: &NodeStatus) -> Vec<Collision> {
        let ours = [
            node.bridge.as_str(),
            weft_dataplane::VXLAN_NAME,
            weft_dataplane::names::SLEEVE_DEVICE,
        ];
        // Pods' host-side veths carry /32 routes into the range.
        let routes: Vec<Route> = self
            .routes
            .iter()
            .filter(|r| !r.device.starts_with("vethwf"))
            .cloned()
            .collect();
        weft_dataplane::underlay::collisions(
            node.range,
            self.interfaces.values(),
            &routes,
            self.service_cidr,
            &ours,
        )
    }
}

/// The agent's view, from its status API.
#[derive(Clone, Debug)]
pub struct Agent {
    /// Why /readyz says not ready.
    pub not_ready: Option<String>,
    pub peers: Vec<PeerStatus>,
    pub connections: Vec<ConnectionStatus>,
    pub targets: Vec<TargetStatus>,
    pub dataplane: DataplaneState,
    pub ipam: IpamStatus,
    /// Datagrams refused, by reason.
    pub dropped: BTreeMap<DropReason, u64>,
}

/// A peer the agent should be connected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedPeer {
    /// Nickname (and name), or the address for a peer not heard yet.
    pub label: String,
    /// Its peer name, once heard of.
    pub name: Option<PeerName>,
    pub address: SocketAddr,
    pub connected: bool,
    pub reachable: bool,
}

impl Agent {
    fn own(&self) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.hops == Some(0))
    }

    /// This node's peer name.
    pub fn me(&self) -> Option<PeerName> {
        self.own().map(|p| p.name)
    }

    pub fn me_address(&self) -> Option<SocketAddr> {
        self.own().map(|p| p.address)
    }

    /// Every other known peer, and every address being tried that no
    /// known peer has.
    pub fn expected(&self) -> Vec<ExpectedPeer> {
        let established = |name: PeerName| {
            self.connections
                .iter()
                .any(|c| c.peer == name && c.state == LinkState::Established)
        };
        let mut out: Vec<ExpectedPeer> = self
            .peers
            .iter()
            .filter(|p| p.hops != Some(0))
            .map(|p| ExpectedPeer {
                label: format!("{} ({})", p.nickname, p.name),
                name: Some(p.name),
                address: p.address,
                connected: established(p.name),
                reachable: p.reachable,
            })
            .collect();
        for t in &self.targets {
            if !out.iter().any(|p| p.address == t.address) {
                out.push(ExpectedPeer {
                    label: t.address.to_string(),
                    name: None,
                    address: t.address,
                    connected: false,
                    reachable: false,
                });
            }
        }
        out
    }
}

/// A CNI configuration file, as a runtime would see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniConfig {
    pub name: String,
    /// The plugin types it chains.
    pub types: Vec<String>,
}

impl CniConfig {
    pub fn is_weft(&self) -> bool {
        self.types
            .iter()
            .any(|t| t == crate::cli::install::PLUGIN_NAME)
    }
}

/// The configurations in `dir` a runtime would consider, in the order it
/// picks them (by file name; `.conf`, `.conflist` and `.json`).
pub fn cni_configs(dir: &Path) -> Result<Vec<CniConfig>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| {
            [".conf", ".conflist", ".json"]
                .iter()
                .any(|x| n.ends_with(x))
        })
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| {
            let types = std::fs::read(dir.join(&name))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .map(|v| plugin_types(&v))
                .unwrap_or_default();
            CniConfig { name, types }
        })
        .collect())
}

/// The `type`s of a conflist's plugins, or of a single-plugin conf.
fn plugin_types(conf: &serde_json::Value) -> Vec<String> {
    let single = conf.get("type").into_iter();
    let listed = conf
        .get("plugins")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("type"));
    single
        .chain(listed)
        .filter_map(|t| t.as_str().map(String::from))
        .collect()
}

/// The installed plugin's version (`weft-cni --version`).
pub fn cni_plugin_version(bin_dir: &Path) -> Result<String, String> {
    let path = bin_dir.join(crate::cli::install::PLUGIN_NAME);
    if !path.exists() {
        return Err("not installed".into());
    }
    let out = std::process::Command::new(&path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("weft-cni ")
        .map(str::to_string)
        .ok_or_else(|| "does not report a version (an older or foreign weft-cni)".into())
}

/// `net.bridge.bridge-nf-call-iptables` on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeNetfilter {
    On,
    Off,
    /// br_netfilter is not loaded: the sysctl does not exist.
    NotLoaded,
    Unreadable,
}

pub fn bridge_netfilter() -> BridgeNetfilter {
    use weft_dataplane::sysctl;
    if !sysctl::bridge_netfilter_loaded() {
        return BridgeNetfilter::NotLoaded;
    }
    match std::fs::read_to_string(sysctl::bridge_nf_call_iptables()) {
        Ok(v) if v.trim() == "1" => BridgeNetfilter::On,
        Ok(_) => BridgeNetfilter::Off,
        Err(_) => BridgeNetfilter::Unreadable,
    }
}

pub fn ip_forwarding() -> Option<bool> {
    let v = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").ok()?;
    Some(v.trim() == "1")
}

/// Reads the agent's status API.
pub fn agent(addr: SocketAddr) -> Result<Agent, String> {
    let status = weft_api::StatusClient::new(addr);
    let not_ready = status.not_ready().map_err(|e| e.to_string())?;
    let page = status
        .connections::<DataplaneState>()
        .map_err(|e| e.to_string())?;
    Ok(Agent {
        not_ready,
        peers: status.peers().map_err(|e| e.to_string())?,
        connections: page.connections,
        targets: page.targets,
        dataplane: page.dataplane,
        ipam: status.ipam().map_err(|e| e.to_string())?,
        dropped: page.dropped,
    })
}

/// Asks the agent's local API (the CNI plugin's socket) for its status.
pub fn node(socket: &Path) -> Result<NodeStatus, String> {
    weft_api::Client::new(socket)
        .status()
        .map_err(|e| e.to_string())
}

/// What a UDP port did with a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortAnswer {
    /// A reply came back.
    Answers,
    /// ICMP port unreachable: the host is up, nothing listens.
    Refused,
    /// Nothing came back: dropped on the way, or the host is down.
    Silent,
}

impl std::fmt::Display for PortAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PortAnswer::Answers => "answers",
            PortAnswer::Refused => "is refused (no listener)",
            PortAnswer::Silent => "gets no answer",
        })
    }
}

/// A peer address's two ports, probed from this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub address: SocketAddr,
    pub control: PortAnswer,
    pub vxlan: PortAnswer,
}

/// Sends `payload` to `to` from a fresh socket and waits up to `wait` for
/// a reply or an ICMP error.
pub fn probe_port(to: SocketAddr, payload: &[u8], wait: Duration) -> PortAnswer {
    let Ok(socket) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return PortAnswer::Silent;
    };
    // Connected, so the kernel reports an ICMP error as ECONNREFUSED.
    if socket.connect(to).is_err() || socket.set_read_timeout(Some(wait)).is_err() {
        return PortAnswer::Silent;
    }
    let _ = socket.send(payload);
    let mut buf = [0u8; 1500];
    match socket.recv(&mut buf) {
        Ok(_) => PortAnswer::Answers,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => PortAnswer::Refused,
        Err(_) => PortAnswer::Silent,
    }
}

/// Whether a probe sent through the peer's VXLAN port comes back: the
/// peer's kernel decapsulates it to its agent's control port, which
/// answers this socket directly (so no ICMP error can be seen: silence is
/// all a blocked port shows).
pub fn probe_vxlan(
    peer: weft_core::PeerName,
    to: SocketAddrV4,
    from: Ipv4Addr,
    wait: Duration,
) -> PortAnswer {
    use weft_dataplane::probe::{Encapsulation, encapsulate};
    let Ok(socket) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return PortAnswer::Silent;
    };
    let Ok(local) = socket.local_addr() else {
        return PortAnswer::Silent;
    };
    let frame = encapsulate(
        &Encapsulation {
            vni: weft_dataplane::DEFAULT_VNI,
            src_mac: weft_dataplane::vtep_mac(0),
            dst_mac: weft_dataplane::vtep_mac(peer.0),
            src: SocketAddrV4::new(from, local.port()),
            dst: to,
        },
        &probe_request(),
    );
    let vxlan = SocketAddr::new(IpAddr::V4(*to.ip()), weft_dataplane::VXLAN_PORT);
    if socket.set_read_timeout(Some(wait)).is_err() || socket.send_to(&frame, vxlan).is_err() {
        return PortAnswer::Silent;
    }
    let mut buf = [0u8; 1500];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) if weft_dataplane::probe::is_probe(&buf[..n]) => PortAnswer::Answers,
        _ => PortAnswer::Silent,
    }
}

/// A probe request, which every agent answers on its control port.
pub fn probe_request() -> Vec<u8> {
    use weft_dataplane::probe::{Probe, ProbeKind};
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Probe {
        kind: ProbeKind::Request,
        nonce,
        sender: weft_core::PeerName(0),
    }
    .encode()
    .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_configs_are_listed_in_the_runtimes_order_with_their_types() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "10-weft.conflist",
            r#"{"plugins":[{"type":"weft-cni"},{"type":"portmap"}]}"#,
        );
        write("05-other.conf", r#"{"type":"bridge"}"#);
        write("README", "not a config");
        write("99-broken.json", "{");
        let found = cni_configs(dir.path()).unwrap();
        let names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["05-other.conf", "10-weft.conflist", "99-broken.json"]
        );
        assert!(!found[0].is_weft() && found[1].is_weft() && !found[2].is_weft());
        assert_eq!(found[1].types, ["weft-cni", "portmap"]);
    }

    #[test]
    fn a_closed_port_is_refused_and_an_echo_answers() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        assert_eq!(
            probe_port(addr, b"x", Duration::from_millis(500)),
            PortAnswer::Refused
        );
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = echo.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            let (n, from) = echo.recv_from(&mut buf).unwrap();
            echo.send_to(&buf[..n], from).unwrap();
        });
        assert_eq!(
            probe_port(addr, b"x", Duration::from_secs(2)),
            PortAnswer::Answers
        );
        server.join().unwrap();
    }
}
