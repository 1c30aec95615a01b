use super::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use weft_api::NodeStatus;
use weft_api::status::{
    ConnectionStatus, IpamPeerStatus, IpamStatus, LinkState, PeerStatus, PendingStatus,
    TargetStatus,
};
use weft_core::PeerName;
use weft_dataplane::probe::PeerDataplane;
use weft_dataplane::status::DataplaneState;
use weft_dataplane::underlay::Interface;

fn peer(
    name: u64,
    nickname: &str,
    address: &str,
    hops: Option<u32>,
    reachable: bool,
) -> PeerStatus {
    PeerStatus {
        name: PeerName(name),
        nickname: nickname.into(),
        address: address.parse().unwrap(),
        version: 1,
        reachable,
        next_hop: None,
        hops,
        connections: 2,
    }
}

fn connection(name: u64) -> ConnectionStatus {
    ConnectionStatus {
        peer: PeerName(name),
        nickname: None,
        address: format!("192.168.1.1{name}:6783").parse().unwrap(),
        state: LinkState::Established,
        last_heard_ms_ago: 100,
    }
}

/// A healthy node 1 of three, connected to both others over fastdp.
fn healthy() -> Facts {
    let agent = Agent {
        not_ready: None,
        peers: vec![
            peer(1, "node1", "192.168.1.11:6783", Some(0), true),
            peer(2, "node2", "192.168.1.12:6783", Some(1), true),
            peer(3, "node3", "192.168.1.13:6783", Some(1), true),
        ],
        connections: vec![connection(2), connection(3)],
        targets: Vec::new(),
        dataplane: DataplaneState {
            in_use: "fastdp".into(),
            ..DataplaneState::new("fastdp")
        },
        ipam: IpamStatus {
            mode: "ring".into(),
            range: "10.32.0.0/12".parse().unwrap(),
            seeded: true,
            seed: Some("00000000000000aa".into()),
            gateway: Some("10.32.0.1".parse().unwrap()),
            peers: vec![IpamPeerStatus {
                name: PeerName(1),
                nickname: "node1".into(),
                reachable: true,
                owned: 100,
                free: 90,
                used: 10,
                prefixes: vec!["10.32.0.0/16".parse().unwrap()],
            }],
            pending: Vec::new(),
            errors: Vec::new(),
        },
        dropped: BTreeMap::new(),
    };
    let interfaces = [
        ("eth0", 1500, "192.168.1.11/24"),
        ("weft", 1450, "10.32.0.1/12"),
        ("weft-vxlan", 1450, ""),
    ]
    .into_iter()
    .map(|(name, mtu, addr)| {
        let addrs = addr.parse().into_iter().collect();
        (
            name.to_string(),
            Interface {
                name: name.into(),
                mtu: Some(mtu),
                addrs,
            },
        )
    })
    .collect();
    Facts {
        status_addr: "127.0.0.1:6784".parse().unwrap(),
        socket: PathBuf::from("/run/weft/weft.sock"),
        agent: Ok(agent),
        node: Ok(NodeStatus {
            ready: true,
            reason: None,
            bridge: "weft".into(),
            mtu: 1450,
            range: "10.32.0.0/12".parse().unwrap(),
            gateway: Some("10.32.0.1".parse().unwrap()),
        }),
        interfaces,
        routes: Vec::new(),
        forwarding: Some(true),
        bridge_netfilter: BridgeNetfilter::On,
        cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
        cni_configs: Ok(vec![CniConfig {
            name: "10-weft.conflist".into(),
            types: vec!["weft-cni".into()],
        }]),
        cni_bin_dir: PathBuf::from("/opt/cni/bin"),
        cni_plugin: Ok(env!("CARGO_PKG_VERSION").into()),
        service_cidr: Some("10.96.0.0/12".parse().unwrap()),
        probes: Vec::new(),
    }
}

fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.check == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

fn agent_mut(f: &mut Facts) -> &mut Agent {
    f.agent.as_mut().unwrap()
}

#[test]
fn a_healthy_node_is_all_ok() {
    let checks = all(&healthy());
    let bad: Vec<_> = checks.iter().filter(|c| c.level != Level::Ok).collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(exit_code(&checks), 0);
    assert_eq!(
        find(&checks, "peers").evidence,
        "2 of 2 peers connected directly"
    );
}

#[test]
fn a_stopped_agent_fails_and_the_node_is_still_checked() {
    let mut f = healthy();
    f.agent = Err("Connection refused (os error 111)".into());
    let checks = all(&f);
    let agent = find(&checks, "agent");
    assert_eq!(agent.level, Level::Fail);
    assert!(
        agent
            .evidence
            .contains("no agent answers at 127.0.0.1:6784")
    );
    assert!(checks.iter().any(|c| c.check == "ip-forward"));
    assert_eq!(exit_code(&checks), 2);
}

#[test]
fn an_unconnected_peer_is_named_with_what_its_ports_did() {
    let mut f = healthy();
    let a = agent_mut(&mut f);
    a.connections.retain(|c| c.peer != PeerName(3));
    a.peers[2].reachable = false;
    f.probes = vec![Probe {
        address: "192.168.1.13:6783".parse().unwrap(),
        control: PortAnswer::Silent,
        vxlan: PortAnswer::Silent,
    }];
    let checks = all(&f);
    assert_eq!(find(&checks, "peers").level, Level::Fail);
    let line = find(&checks, "peer node3 (0000:0000:0000:0003)");
    assert_eq!(line.level, Level::Fail);
    assert!(
        line.evidence.contains("UDP 6783 gets no answer"),
        "{}",
        line.evidence
    );
    assert!(line.fix.as_deref().unwrap().contains("firewall"));
}

#[test]
fn a_target_never_heard_from_is_expected_too() {
    let mut f = healthy();
    agent_mut(&mut f).targets.push(TargetStatus {
        address: "192.168.1.14:6783".parse().unwrap(),
        configured: true,
        attempts: 3,
        next_try_in_ms: 1000,
    });
    f.probes = vec![Probe {
        address: "192.168.1.14:6783".parse().unwrap(),
        control: PortAnswer::Refused,
        vxlan: PortAnswer::Refused,
    }];
    let checks = all(&f);
    assert_eq!(
        find(&checks, "peers").evidence.split(';').next().unwrap(),
        "2 of 3 peers connected directly"
    );
    let line = find(&checks, "peer 192.168.1.14:6783");
    assert!(line.fix.as_deref().unwrap().contains("no agent listens"));
}

#[test]
fn a_peer_on_the_sleeve_is_a_warning_with_the_reason() {
    let mut f = healthy();
    agent_mut(&mut f).dataplane.peers = vec![PeerDataplane {
        peer: PeerName(2),
        nickname: "node2".into(),
        underlay: "192.168.1.12".parse().unwrap(),
        dataplane: "sleeve".into(),
        reason: Some("no reply over VXLAN (UDP 6784)".into()),
        last_reply_ms_ago: None,
    }];
    let checks = all(&f);
    let d = find(&checks, "dataplane");
    assert_eq!(d.level, Level::Warn);
    assert!(
        d.evidence
            .contains("node2 uses sleeve: no reply over VXLAN (UDP 6784)")
    );
    assert_eq!(exit_code(&checks), 1);
}

#[test]
fn an_underlay_too_small_for_the_pod_mtu_fails() {
    let mut f = healthy();
    f.interfaces.get_mut("eth0").unwrap().mtu = Some(1400);
    let c = find(&all(&f), "mtu").clone();
    assert_eq!(c.level, Level::Fail);
    assert!(
        c.evidence.contains("exceeds the underlay's 1400"),
        "{}",
        c.evidence
    );
    assert!(c.fix.unwrap().contains("(1350)"));
}

#[test]
fn a_conflist_sorting_before_weft_fails() {
    let mut f = healthy();
    f.cni_configs = Ok(vec![
        CniConfig {
            name: "05-bridge.conf".into(),
            types: vec!["bridge".into()],
        },
        CniConfig {
            name: "10-weft.conflist".into(),
            types: vec!["weft-cni".into()],
        },
    ]);
    let c = find(&all(&f), "cni-config").clone();
    assert_eq!(c.level, Level::Fail);
    assert!(
        c.evidence
            .starts_with("05-bridge.conf sorts before weft's 10-weft.conflist")
    );
}

#[test]
fn a_range_overlapping_the_services_or_a_route_fails() {
    let mut f = healthy();
    f.service_cidr = Some("10.32.0.0/16".parse().unwrap());
    f.routes.push(weft_dataplane::underlay::Route {
        destination: "10.33.0.0/16".parse().unwrap(),
        device: "eth0".into(),
        gateway: Some("192.168.1.1".parse().unwrap()),
        table: weft_dataplane::underlay::MAIN_TABLE,
    });
    let c = find(&all(&f), "range").clone();
    assert_eq!(c.level, Level::Fail);
    assert!(
        c.evidence
            .contains("the route 10.33.0.0/16 dev eth0 overlaps it")
    );
    assert!(
        c.evidence
            .contains("the service range 10.32.0.0/16 overlaps it")
    );
}

#[test]
fn forwarding_off_a_missing_plugin_and_refused_datagrams_are_reported() {
    let mut f = healthy();
    f.forwarding = Some(false);
    f.cni_plugin = Err("not installed".into());
    agent_mut(&mut f)
        .dropped
        .insert(weft_api::status::DropReason::Authentication, 3);
    let checks = all(&f);
    assert_eq!(find(&checks, "ip-forward").level, Level::Fail);
    assert_eq!(find(&checks, "cni-plugin").level, Level::Fail);
    let d = find(&checks, "datagrams");
    assert_eq!(d.level, Level::Ok, "every peer connected: history");
    assert!(d.evidence.contains("authentication 3"));
    agent_mut(&mut f).connections.pop();
    let checks = all(&f);
    let d = find(&checks, "datagrams");
    assert_eq!(d.level, Level::Warn, "a peer unconnected: a likely cause");
    assert!(d.fix.as_deref().unwrap().contains("different password"));
}

#[test]
fn an_unseeded_ring_and_pending_allocations_are_explained() {
    let mut f = healthy();
    agent_mut(&mut f).ipam.seeded = false;
    assert_eq!(find(&all(&f), "ipam").level, Level::Fail);
    let mut f = healthy();
    agent_mut(&mut f).ipam.pending.push(PendingStatus {
        container: "c1".into(),
        reason: "awaiting a donation".into(),
    });
    let c = find(&all(&f), "ipam").clone();
    assert_eq!(c.level, Level::Warn);
    assert!(c.evidence.contains("c1 (awaiting a donation)"));
}

#[test]
fn bridge_netfilter_off_or_not_loaded_names_same_node_services() {
    let mut f = healthy();
    assert_eq!(find(&all(&f), "bridge-nf").level, Level::Ok);
    f.bridge_netfilter = BridgeNetfilter::Off;
    let checks = all(&f);
    let c = find(&checks, "bridge-nf");
    assert_eq!(c.level, Level::Fail);
    assert!(
        c.evidence
            .contains("Services whose backend is on the same node")
    );
    assert!(
        c.fix
            .as_deref()
            .unwrap()
            .contains("bridge-nf-call-iptables=1")
    );
    f.bridge_netfilter = BridgeNetfilter::NotLoaded;
    let checks = all(&f);
    let c = find(&checks, "bridge-nf");
    assert_eq!(c.level, Level::Warn);
    assert!(c.evidence.contains("br_netfilter module is not loaded"));
    assert!(
        c.evidence
            .contains("Services whose backend is on the same node")
    );
    assert!(
        c.fix
            .as_deref()
            .unwrap()
            .starts_with("modprobe br_netfilter")
    );
}
