//! The checklist: each check turns gathered facts into one verdict with
//! its evidence and, when something is wrong, the fix. Pure functions over
//! [`Facts`], so every verdict is unit-tested without a node.

use super::facts::{Agent, BridgeNetfilter, CniConfig, Facts, PortAnswer, Probe};
use serde::Serialize;
use weft_api::status::{DropReason, drop_reason_name};
use weft_dataplane::underlay::Collision;

/// How bad a finding is; the worst one sets the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub check: String,
    pub level: Level,
    pub evidence: String,
    /// What to do about it (not for `ok`).
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(check: &str, evidence: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            level: Level::Ok,
            evidence: evidence.into(),
            fix: None,
        }
    }

    pub fn warn(check: &str, evidence: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            level: Level::Warn,
            fix: Some(fix.into()),
            ..Check::ok(check, evidence)
        }
    }

    pub fn fail(check: &str, evidence: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            level: Level::Fail,
            fix: Some(fix.into()),
            ..Check::ok(check, evidence)
        }
    }
}

/// VXLAN's overhead on an IPv4 underlay: outer IP, UDP, VXLAN, Ethernet.
pub const VXLAN_OVERHEAD: u32 = 50;

/// Every check, in the order an operator would walk them.
pub fn all(facts: &Facts) -> Vec<Check> {
    let mut out = vec![agent(facts)];
    let Ok(agent) = &facts.agent else {
        // Nothing else about the network can be known without the agent,
        // but the node's own configuration still can.
        out.extend(node_checks(facts, None));
        return out;
    };
    out.push(ready(agent));
    out.push(peers(agent));
    out.extend(unconnected(agent, &facts.probes));
    out.push(dataplane(agent));
    out.push(ipam(agent));
    out.push(drops(agent));
    out.extend(node_checks(facts, Some(agent)));
    out
}

/// Checks of the node itself, which hold with or without the agent.
fn node_checks(facts: &Facts, agent: Option<&Agent>) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(agent) = agent {
        out.push(bridge(facts, agent));
        out.push(mtu(facts, agent));
        out.push(range(facts));
    }
    out.push(cni_config(&facts.cni_configs, &facts.cni_conf_dir));
    out.push(cni_plugin(facts));
    out.push(forwarding(facts.forwarding));
    out.push(bridge_netfilter(facts.bridge_netfilter));
    out
}

fn agent(facts: &Facts) -> Check {
    let socket = facts.socket.display();
    match (&facts.agent, &facts.node) {
        (Ok(_), Ok(_)) => Check::ok(
            "agent",
            format!("the agent answers on {} and on {socket}", facts.status_addr),
        ),
        (Err(e), _) => Check::fail(
            "agent",
            format!("no agent answers at {}: {e}", facts.status_addr),
            "start it: `kubectl -n kube-system get pods -l app.kubernetes.io/name=weft -o wide` and the pod's logs (`kubectl -n kube-system logs <pod> -c weft`); outside Kubernetes run `weft router`",
        ),
        (Ok(_), Err(e)) => Check::fail(
            "agent",
            format!(
                "the agent answers at {} but not on {socket}: {e}",
                facts.status_addr
            ),
            "pods cannot get addresses: check that /run/weft is the agent's --socket directory (the DaemonSet mounts it from the host) and restart the agent",
        ),
    }
}

fn ready(agent: &Agent) -> Check {
    match &agent.not_ready {
        None => Check::ok("ready", "the agent is ready to give pods addresses"),
        Some(why) => Check::fail(
            "ready",
            format!("not ready: {why}"),
            "see the ipam and peers lines below; `weft status` has the whole picture",
        ),
    }
}

fn peers(agent: &Agent) -> Check {
    let expected = agent.expected();
    let connected = expected.iter().filter(|p| p.connected).count();
    let total = expected.len();
    let unreachable: Vec<&str> = expected
        .iter()
        .filter(|p| !p.reachable)
        .map(|p| p.label.as_str())
        .collect();
    if total == 0 {
        return Check::warn(
            "peers",
            "no other peer is known",
            "give peers with --peer / WEFT_PEERS, or run with --kube so Nodes are peers; a single-node cluster needs nothing",
        );
    }
    let evidence = format!("{connected} of {total} peers connected directly");
    if !unreachable.is_empty() {
        return Check::fail(
            "peers",
            format!(
                "{evidence}; unreachable: {} (pods there cannot be reached)",
                unreachable.join(", ")
            ),
            "see the lines for each unconnected peer below",
        );
    }
    if connected < total {
        return Check::warn(
            "peers",
            format!("{evidence}; the others are reached through a relay"),
            "relayed traffic costs a hop: see the lines for each unconnected peer below",
        );
    }
    Check::ok("peers", evidence)
}

/// One line per unconnected peer, naming what its ports answered.
fn unconnected(agent: &Agent, probes: &[Probe]) -> Vec<Check> {
    agent
        .expected()
        .into_iter()
        .filter(|p| !p.connected)
        .map(|peer| {
            let probe = probes.iter().find(|p| p.address == peer.address);
            let check = format!("peer {}", peer.label);
            let how = if peer.reachable {
                "relayed"
            } else {
                "unreachable"
            };
            let Some(probe) = probe else {
                return Check::warn(
                    &check,
                    format!("not connected ({how}), {} not probed", peer.address),
                    "run `weft doctor` again",
                );
            };
            let evidence = format!(
                "not connected ({how}); from here UDP {} {} and VXLAN (UDP {}) {}",
                probe.address.port(),
                probe.control,
                weft_dataplane::VXLAN_PORT,
                probe.vxlan
            );
            let fix = match probe.control {
                PortAnswer::Answers => {
                    "its agent answers: it refuses the connection (a different WEFT_PASSWORD? over its --conn-limit?); see that node's `weft status` and the datagrams line"
                }
                PortAnswer::Refused => {
                    "the node is up but no agent listens on 6783: start weft there (`kubectl -n kube-system get pods -o wide`)"
                }
                PortAnswer::Silent => {
                    "nothing comes back: a firewall, security group or NAT between the nodes drops UDP 6783-6784, or the node is down; allow UDP 6783 and 6784 between all nodes"
                }
            };
            Check::fail(&check, evidence, fix)
        })
        .collect()
}

fn dataplane(agent: &Agent) -> Check {
    let d = &agent.dataplane;
    if let Some(e) = &d.kernel_error {
        return Check::fail(
            "dataplane",
            format!("{}: the kernel refused weft's configuration: {e}", d.in_use),
            "see the agent's log; `weft reset` (agent stopped) removes weft's devices so the agent can recreate them",
        );
    }
    let fell_back: Vec<String> = d
        .peers
        .iter()
        .filter(|p| p.dataplane != "fastdp" && d.in_use == "fastdp")
        .map(|p| {
            format!(
                "{} uses {}: {}",
                p.nickname,
                p.dataplane,
                p.reason.as_deref().unwrap_or("no reason given")
            )
        })
        .collect();
    if let Some(why) = &d.fallback {
        return Check::warn(
            "dataplane",
            format!("{} (fell back from {}: {why})", d.in_use, d.requested),
            "the sleeve is slower than kernel VXLAN: load the vxlan module (`modprobe vxlan`) and restart the agent",
        );
    }
    if !fell_back.is_empty() {
        return Check::warn(
            "dataplane",
            format!("{}; {}", d.in_use, fell_back.join("; ")),
            "allow UDP 6784 (VXLAN) between the nodes; traffic falls back to the slower sleeve on UDP 6783 until then",
        );
    }
    let per_peer = match d.peers.len() {
        0 => String::new(),
        n => format!(" to all {n} direct peers"),
    };
    Check::ok("dataplane", format!("{}{per_peer}", d.in_use))
}

fn ipam(agent: &Agent) -> Check {
    let i = &agent.ipam;
    if !i.errors.is_empty() {
        return Check::fail(
            "ipam",
            i.errors.join("; "),
            "two rings cannot be merged, or podCIDRs overlap: see `weft status ipam`; a node with the wrong ring must be reset (`weft rmpeer` on the others, wipe its --data-dir)",
        );
    }
    if i.mode == "ring" && !i.seeded {
        return Check::fail(
            "ipam",
            "the ring is not seeded: waiting for the initial peers to agree",
            "all initial peers (IPALLOC_INIT consensus=N) must be connected once; check the peers lines, or start this node as an observer",
        );
    }
    let waiting: Vec<String> = i
        .pending
        .iter()
        .map(|p| format!("{} ({})", p.container, p.reason))
        .collect();
    if !waiting.is_empty() {
        return Check::warn(
            "ipam",
            format!("allocations waiting: {}", waiting.join(", ")),
            "they complete when space arrives: connect the peers that own space, or reclaim a removed one with `weft rmpeer`",
        );
    }
    let lost: Vec<&str> = i
        .peers
        .iter()
        .filter(|p| !p.reachable && p.owned > 0)
        .map(|p| p.nickname.as_str())
        .collect();
    let mine = i.peers.iter().find(|p| Some(p.name) == agent.me());
    let used = mine.map_or(0, |p| p.used);
    let free = mine.map_or(0, |p| p.free);
    let evidence = format!("{} mode, {used} addresses used, {free} free here", i.mode);
    if !lost.is_empty() {
        return Check::warn(
            "ipam",
            format!(
                "{evidence}; space owned by unreachable peers: {}",
                lost.join(", ")
            ),
            "if those nodes are gone for good, `weft rmpeer <name>` (with --kube, deleting their Node does it)",
        );
    }
    Check::ok("ipam", evidence)
}

fn drops(agent: &Agent) -> Check {
    let refused: u64 = agent
        .dropped
        .iter()
        .filter(|(reason, _)| {
            matches!(
                reason,
                DropReason::Authentication
                    | DropReason::Unencrypted
                    | DropReason::NoSecret
                    | DropReason::UnsupportedVersion
            )
        })
        .map(|(_, n)| n)
        .sum();
    let list = agent
        .dropped
        .iter()
        .map(|(reason, n)| format!("{} {n}", drop_reason_name(*reason)))
        .collect::<Vec<_>>()
        .join(", ");
    // Counters run since the agent started: refusals matter while some
    // peer is not connected, and are history once every peer is.
    let unconnected = agent.expected().iter().any(|p| !p.connected);
    if refused > 0 && unconnected {
        return Check::warn(
            "datagrams",
            format!("peers' datagrams refused: {list}"),
            "a peer has a different password (WEFT_PASSWORD) or weft version: give every node the same",
        );
    }
    if refused > 0 {
        return Check::ok(
            "datagrams",
            format!("refused since the agent started: {list}; every peer is connected now"),
        );
    }
    match list.is_empty() {
        true => Check::ok("datagrams", "no datagram refused"),
        false => Check::ok("datagrams", format!("dropped: {list}")),
    }
}

fn bridge(facts: &Facts, agent: &Agent) -> Check {
    let Ok(node) = &facts.node else {
        return Check::warn(
            "bridge",
            "unknown: the agent's socket does not answer",
            "see the agent line",
        );
    };
    if agent.dataplane.requested == "none" {
        return Check::ok("bridge", "not used (--datapath none)");
    }
    let Some(gateway) = node.gateway else {
        return Check::fail(
            "bridge",
            format!(
                "bridge {}: no gateway yet, the node has no address space",
                node.bridge
            ),
            "see the ipam line",
        );
    };
    match facts.interfaces.get(&node.bridge) {
        None => Check::fail(
            "bridge",
            format!("bridge {} does not exist", node.bridge),
            "the agent creates it: see its log for kernel errors; restart the agent",
        ),
        Some(i) if i.addrs.iter().any(|a| a.addr() == gateway) => Check::ok(
            "bridge",
            format!("bridge {} holds the gateway {gateway}", node.bridge),
        ),
        Some(_) => Check::fail(
            "bridge",
            format!("bridge {} lacks the gateway address {gateway}", node.bridge),
            "pods' default route points at it: restart the agent, which re-adds it",
        ),
    }
}

fn mtu(facts: &Facts, agent: &Agent) -> Check {
    let Ok(node) = &facts.node else {
        return Check::warn(
            "mtu",
            "unknown: the agent's socket does not answer",
            "see the agent line",
        );
    };
    let underlay = facts.underlay_device();
    let underlay_mtu = underlay.and_then(|i| i.mtu);
    let device = |name: &str| facts.interfaces.get(name).and_then(|i| i.mtu);
    let mut seen = vec![format!("pods {}", node.mtu)];
    let mut problems = Vec::new();
    for name in [
        node.bridge.as_str(),
        weft_dataplane::VXLAN_NAME,
        weft_dataplane::names::SLEEVE_DEVICE,
    ] {
        if let Some(m) = device(name) {
            seen.push(format!("{name} {m}"));
            if m != node.mtu && name != node.bridge {
                problems.push(format!("{name} has {m}, pods {}", node.mtu));
            }
        }
    }
    if let (Some(u), Some(i)) = (underlay_mtu, underlay) {
        seen.push(format!("underlay {} {u}", i.name));
        if agent.dataplane.in_use == "fastdp" && node.mtu + VXLAN_OVERHEAD > u {
            problems.push(format!(
                "pods' {} + VXLAN's {VXLAN_OVERHEAD} exceeds the underlay's {u}: full-size packets are dropped",
                node.mtu
            ));
        }
    }
    let evidence = seen.join(", ");
    match problems.is_empty() {
        true => Check::ok("mtu", evidence),
        false => Check::fail(
            "mtu",
            format!("{evidence}: {}", problems.join("; ")),
            format!(
                "set WEFT_MTU (--mtu) to at most the underlay MTU minus {VXLAN_OVERHEAD}{}, restart the agent, then recreate pods",
                underlay_mtu.map_or(String::new(), |u| format!(
                    " ({})",
                    u.saturating_sub(VXLAN_OVERHEAD)
                ))
            ),
        ),
    }
}

fn range(facts: &Facts) -> Check {
    let Ok(node) = &facts.node else {
        return Check::warn(
            "range",
            "unknown: the agent's socket does not answer",
            "see the agent line",
        );
    };
    let collisions: Vec<String> = facts
        .collisions(node)
        .iter()
        .map(Collision::to_string)
        .collect();
    match collisions.is_empty() {
        true => Check::ok(
            "range",
            format!(
                "{} overlaps no node network, route{}",
                node.range,
                match facts.service_cidr {
                    Some(s) => format!(" or the service range {s}"),
                    None => " (no --service-cidr given to compare)".into(),
                }
            ),
        ),
        false => Check::fail(
            "range",
            format!("{}: {}", node.range, collisions.join("; ")),
            "choose an IPALLOC_RANGE that overlaps nothing on the nodes or the service range, on every node (the agents must agree), and wipe /var/lib/weft",
        ),
    }
}

fn cni_config(configs: &Result<Vec<CniConfig>, String>, dir: &std::path::Path) -> Check {
    let dir = dir.display();
    let configs = match configs {
        Ok(c) => c,
        Err(e) => {
            return Check::fail(
                "cni-config",
                format!("cannot read {dir}: {e}"),
                "run `weft install-cni` (the DaemonSet's init container does)",
            );
        }
    };
    let Some(first) = configs.first() else {
        return Check::fail(
            "cni-config",
            format!("{dir} holds no CNI configuration"),
            "run `weft install-cni` (the DaemonSet's init container does)",
        );
    };
    let ours: Vec<&CniConfig> = configs.iter().filter(|c| c.is_weft()).collect();
    if ours.is_empty() {
        return Check::fail(
            "cni-config",
            format!(
                "no weft configuration in {dir}; the runtime uses {}",
                first.name
            ),
            "run `weft install-cni`, and remove the other network's configuration if it is not wanted",
        );
    }
    if !first.is_weft() {
        return Check::fail(
            "cni-config",
            format!(
                "{} sorts before weft's {} in {dir}: the runtime uses it, not weft",
                first.name, ours[0].name
            ),
            format!(
                "remove {dir}/{} (left by another network add-on), or rename it to sort after {}",
                first.name, ours[0].name
            ),
        );
    }
    let others: Vec<&str> = configs[1..].iter().map(|c| c.name.as_str()).collect();
    match others.is_empty() {
        true => Check::ok(
            "cni-config",
            format!("{dir}/{} is the only configuration", first.name),
        ),
        false => Check::ok(
            "cni-config",
            format!(
                "{dir}/{} is first (also there, unused: {})",
                first.name,
                others.join(", ")
            ),
        ),
    }
}

fn cni_plugin(facts: &Facts) -> Check {
    let path = facts.cni_bin_dir.join(crate::cli::install::PLUGIN_NAME);
    let path = path.display();
    let ours = env!("CARGO_PKG_VERSION");
    match &facts.cni_plugin {
        Err(e) => Check::fail(
            "cni-plugin",
            format!("{path}: {e}"),
            "run `weft install-cni` (the DaemonSet's init container does)",
        ),
        Ok(version) if version == ours => Check::ok(
            "cni-plugin",
            format!("{path} is version {version}, as the agent"),
        ),
        Ok(version) => Check::warn(
            "cni-plugin",
            format!("{path} is version {version}, the agent {ours}"),
            "run `weft install-cni` from this version (restarting the DaemonSet pod does)",
        ),
    }
}

fn bridge_netfilter(state: BridgeNetfilter) -> Check {
    const NAME: &str = "bridge-nf";
    match state {
        BridgeNetfilter::On => Check::ok(NAME, "net.bridge.bridge-nf-call-iptables = 1"),
        BridgeNetfilter::Off => Check::fail(
            NAME,
            "net.bridge.bridge-nf-call-iptables = 0: kube-proxy does not see traffic the bridge switches between pods on this node, so Services whose backend is on the same node do not answer",
            "sysctl -w net.bridge.bridge-nf-call-iptables=1 (and set it in /etc/sysctl.d so it survives a reboot); the agent sets it when it programs the dataplane",
        ),
        BridgeNetfilter::NotLoaded => Check::warn(
            NAME,
            weft_dataplane::sysctl::WITHOUT_BRIDGE_NETFILTER,
            "modprobe br_netfilter (and list it in /etc/modules-load.d so it loads at boot); the agent then sets the sysctl within 30 s",
        ),
        BridgeNetfilter::Unreadable => Check::warn(
            NAME,
            "cannot read /proc/sys/net/bridge/bridge-nf-call-iptables",
            "run weft doctor as root on the node",
        ),
    }
}

fn forwarding(on: Option<bool>) -> Check {
    match on {
        Some(true) => Check::ok("ip-forward", "net.ipv4.ip_forward = 1"),
        Some(false) => Check::fail(
            "ip-forward",
            "net.ipv4.ip_forward = 0: the node does not route pod traffic",
            "sysctl -w net.ipv4.ip_forward=1 (and set it in /etc/sysctl.d so it survives a reboot); the agent sets it when it programs the dataplane",
        ),
        None => Check::warn(
            "ip-forward",
            "cannot read /proc/sys/net/ipv4/ip_forward",
            "run weft doctor as root on the node",
        ),
    }
}

/// The exit status: 0 all ok, 1 warnings, 2 failures.
pub fn exit_code(checks: &[Check]) -> u8 {
    match checks.iter().map(|c| c.level).max() {
        Some(Level::Fail) => 2,
        Some(Level::Warn) => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests;
