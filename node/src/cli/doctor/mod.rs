//! `weft doctor`: the troubleshooting checklist as one command. Gathers
//! facts about the agent and the node (`facts`), judges them (`checks`),
//! optionally probes from every local pod (`pods`) and asks the API server
//! about every node (`cluster`), then prints one line per check.

mod checks;
mod cluster;
mod facts;
mod pods;
mod remote;

pub use checks::{Check, Level};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// How long a port probe waits for an answer.
const PROBE_WAIT: Duration = Duration::from_millis(400);

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Print the checks as JSON (`{"checks": [...], "exit": N}`).
    #[arg(long)]
    pub json: bool,
    /// Also probe from every local pod's network namespace: its default
    /// route, and a ping to one pod on every other node.
    #[arg(long)]
    pub pods: bool,
    /// Also check every node through the Kubernetes API (KUBECONFIG, or
    /// in-cluster): agent pod running and ready, peer connected, Node
    /// condition.
    #[arg(long)]
    pub cluster: bool,
    /// The agent's status address.
    #[arg(long, env = "WEFT_STATUS_ADDR", default_value = "127.0.0.1:6784")]
    pub status_addr: SocketAddr,
    /// The agent's local API socket.
    #[arg(long, env = "WEFT_SOCKET", default_value = "/run/weft/weft.sock")]
    pub socket: PathBuf,
    /// Where runtimes read CNI configurations.
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Where runtimes find CNI plugins.
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The cluster's service range, to check the pod range against.
    #[arg(long, env = "WEFT_SERVICE_CIDR")]
    pub service_cidr: Option<ipnet::Ipv4Net>,
}

pub fn main(args: DoctorArgs) -> ExitCode {
    let facts = gather(&args);
    let mut checks = checks::all(&facts);
    if args.pods {
        checks.extend(pods::checks(&facts));
    }
    if args.cluster {
        checks.extend(cluster::checks(&facts));
    }
    let code = checks::exit_code(&checks);
    if args.json {
        let out = serde_json::json!({ "checks": checks, "exit": code });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        for c in &checks {
            println!("{}", line(c));
        }
    }
    ExitCode::from(code)
}

/// `ok    name        evidence` or `FAIL  name        evidence; fix: …`.
pub fn line(c: &Check) -> String {
    let level = match c.level {
        Level::Ok => "ok",
        Level::Warn => "warn",
        Level::Fail => "FAIL",
    };
    match &c.fix {
        Some(fix) => format!("{level:<5} {:<12} {}; fix: {fix}", c.check, c.evidence),
        None => format!("{level:<5} {:<12} {}", c.check, c.evidence),
    }
}

fn gather(args: &DoctorArgs) -> facts::Facts {
    let agent = facts::agent(args.status_addr);
    let probes = match &agent {
        Ok(agent) => probe_unconnected(agent),
        Err(_) => Vec::new(),
    };
    facts::Facts {
        status_addr: args.status_addr,
        socket: args.socket.clone(),
        node: facts::node(&args.socket),
        agent,
        interfaces: weft_dataplane::underlay::interfaces(),
        routes: weft_dataplane::underlay::routes(),
        forwarding: facts::ip_forwarding(),
        bridge_netfilter: facts::bridge_netfilter(),
        cni_conf_dir: args.cni_conf_dir.clone(),
        cni_configs: facts::cni_configs(&args.cni_conf_dir),
        cni_bin_dir: args.cni_bin_dir.clone(),
        cni_plugin: facts::cni_plugin_version(&args.cni_bin_dir),
        service_cidr: args.service_cidr,
        probes,
    }
}

/// Probes every unconnected peer's ports at once (each waits the same
/// short while), so a dead cluster does not make the doctor slow.
fn probe_unconnected(agent: &facts::Agent) -> Vec<facts::Probe> {
    let me = match agent.me_address().map(|a| a.ip()) {
        Some(std::net::IpAddr::V4(ip)) => Some(ip),
        _ => None,
    };
    let handles: Vec<_> = agent
        .expected()
        .into_iter()
        .filter(|p| !p.connected)
        .map(|peer| {
            std::thread::spawn(move || {
                let control = facts::probe_port(peer.address, &facts::probe_request(), PROBE_WAIT);
                let vxlan = match (peer.name, peer.address, me) {
                    (Some(name), SocketAddr::V4(to), Some(from)) => {
                        facts::probe_vxlan(name, to, from, PROBE_WAIT)
                    }
                    _ => facts::PortAnswer::Silent,
                };
                facts::Probe {
                    address: peer.address,
                    control,
                    vxlan,
                }
            })
        })
        .collect();
    handles.into_iter().filter_map(|h| h.join().ok()).collect()
}
