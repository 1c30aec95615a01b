//! Compiled rules decide every packet as the reference evaluator does, on
//! generated clusters, policies and packets, split over nodes the way the
//! agent splits them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use proptest::prelude::*;

use crate::compile::{RuleSet, compile};
use crate::model::{
    Cluster, ContainerPort, IpBlock, Namespace, Peer, Pod, Policy, PolicyType, Port, PortSpec,
    Protocol, Rule,
};
use crate::reference::{Packet, allowed};
use crate::selector::{LabelSelector, Operator, Requirement};

const KEYS: [&str; 2] = ["app", "tier"];
const VALUES: [&str; 2] = ["a", "b"];
const PORT_NAMES: [&str; 4] = ["http", "dns", "", "metrics"];
const NUMBERS: [u16; 7] = [1, 53, 80, 81, 443, 8080, 65535];
const NODES: u8 = 3;

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(&KEYS[..]).prop_map(String::from),
        prop::sample::select(&VALUES[..]).prop_map(String::from),
        0..=2,
    )
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![4 => Just(Protocol::Tcp), 2 => Just(Protocol::Udp), 1 => Just(Protocol::Sctp)]
}

fn requirement() -> impl Strategy<Value = Requirement> {
    let values = prop::collection::vec(
        prop::sample::select(&VALUES[..]).prop_map(String::from),
        0..=2,
    );
    let operator = prop::sample::select(vec![
        Operator::In,
        Operator::NotIn,
        Operator::Exists,
        Operator::DoesNotExist,
    ]);
    (prop::sample::select(&KEYS[..]), operator, values).prop_map(|(key, operator, mut values)| {
        // Mostly valid: the API server refuses the rest, so do we.
        if matches!(operator, Operator::Exists | Operator::DoesNotExist)
            && (values.len() < 2 || key == "app")
        {
            values.clear();
        }
        if matches!(operator, Operator::In | Operator::NotIn) && values.is_empty() && key == "app" {
            values.push("a".into());
        }
        Requirement {
            key: key.into(),
            operator,
            values,
        }
    })
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    (
        prop::collection::btree_map(
            prop::sample::select(&KEYS[..]).prop_map(String::from),
            prop::sample::select(&VALUES[..]).prop_map(String::from),
            0..=1,
        ),
        prop::collection::vec(requirement(), 0..=1),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
}

/// Blocks over the pod subnet (10.32.0.0/28), the nodes and the world;
/// excepts mostly inside their block, sometimes not (invalid).
fn ip_block() -> impl Strategy<Value = IpBlock> {
    let cidr = prop::sample::select(vec![
        "10.32.0.0/28",
        "10.32.0.0/29",
        "10.32.0.8/29",
        "10.32.0.4/30",
        "10.32.0.5/32",
        "0.0.0.0/0",
        "0.0.0.0/0",
        "192.168.1.0/30",
        "10.0.0.0/8",
        "::/0",
        "10.32.0.0/33",
    ]);
    let except = prop::sample::select(vec![
        "10.32.0.0/30",
        "10.32.0.2/31",
        "10.32.0.9/32",
        "10.32.0.12/30",
        "192.168.1.2/32",
        "8.8.8.0/24",
        "10.32.0.0/29",
    ]);
    (cidr, prop::collection::vec(except, 0..=2)).prop_map(|(cidr, except)| {
        let mut block = IpBlock {
            cidr: cidr.into(),
            except: except.into_iter().map(String::from).collect(),
        };
        // Keep an except that does not fit only now and then.
        if block.parse().is_err() && block.except.len() > 1 {
            block.except.retain(|e| {
                IpBlock {
                    cidr: block.cidr.clone(),
                    except: vec![e.clone()],
                }
                .parse()
                .is_ok()
            });
        }
        block
    })
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        3 => (prop::option::weighted(0.9, selector()), prop::option::weighted(0.4, selector()))
            .prop_map(|(pod_selector, namespace_selector)| Peer::Pods { pod_selector, namespace_selector }),
        2 => ip_block().prop_map(Peer::IpBlock),
    ]
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    let port = prop_oneof![
        1 => Just(None),
        3 => prop::sample::select(&NUMBERS[..]).prop_map(|n| Some(Port::Number(n))),
        2 => prop::sample::select(&PORT_NAMES[..]).prop_map(|n| Some(Port::Name(n.into()))),
    ];
    let end_port = prop::option::weighted(0.3, prop::sample::select(&NUMBERS[..]));
    (protocol(), port, end_port).prop_map(|(protocol, port, end_port)| {
        // endPort only beside a number, mostly.
        let end_port = end_port.filter(|_| matches!(port, Some(Port::Number(_))));
        PortSpec {
            protocol,
            port,
            end_port,
        }
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::option::of(prop::collection::vec(peer(), 0..=3)),
        prop::option::of(prop::collection::vec(port_spec(), 0..=3)),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn policy(namespaces: usize) -> impl Strategy<Value = Policy> {
    let types = prop::option::of(prop::sample::subsequence(
        vec![PolicyType::Ingress, PolicyType::Egress],
        0..=2,
    ));
    (
        0..=namespaces,
        selector(),
        types,
        prop::option::of(prop::collection::vec(rule(), 0..=2)),
        prop::option::of(prop::collection::vec(rule(), 0..=2)),
    )
        .prop_map(|(ns, pod_selector, policy_types, ingress, egress)| Policy {
            // One past the listed namespaces: a namespace the cluster lacks.
            namespace: format!("ns{ns}"),
            name: String::new(),
            pod_selector,
            policy_types,
            ingress,
            egress,
        })
}

/// A pod and its node. Addresses come from a /28 of 14 pods' worth, so
/// some pods share one; hostNetwork pods have their node's address.
fn pod(namespaces: usize) -> impl Strategy<Value = (Pod, u8)> {
    let container_port = (
        prop::sample::select(&PORT_NAMES[..]),
        prop::sample::select(&NUMBERS[..]),
        protocol(),
    )
        .prop_map(|(name, port, protocol)| ContainerPort {
            name: name.into(),
            port,
            protocol,
        });
    (
        0..namespaces,
        labels(),
        prop::option::weighted(0.9, 1..=14u8),
        prop::bool::weighted(0.15),
        prop::collection::vec(container_port, 0..=3),
        0..NODES,
    )
        .prop_map(|(ns, labels, host, host_network, ports, node)| {
            let ip = if host_network {
                Some(Ipv4Addr::new(192, 168, 1, node + 1))
            } else {
                host.map(|h| Ipv4Addr::new(10, 32, 0, h))
            };
            let pod = Pod {
                namespace: format!("ns{ns}"),
                name: String::new(),
                labels,
                ip,
                host_network,
                ports,
            };
            (pod, node)
        })
}

fn scenario() -> impl Strategy<Value = (Cluster, Vec<u8>)> {
    (2..=4usize).prop_flat_map(|namespaces| {
        let ns = prop::collection::vec(labels(), namespaces).prop_map(|all| {
            all.into_iter()
                .enumerate()
                .map(|(i, labels)| Namespace {
                    name: format!("ns{i}"),
                    labels,
                })
                .collect::<Vec<_>>()
        });
        (
            ns,
            prop::collection::vec(pod(namespaces), 0..=12),
            prop::collection::vec(policy(namespaces), 0..=6),
        )
            .prop_map(|(namespaces, pods, mut policies)| {
                let (mut pods, nodes): (Vec<Pod>, Vec<u8>) = pods.into_iter().unzip();
                for (i, pod) in pods.iter_mut().enumerate() {
                    pod.name = format!("p{i}");
                }
                for (i, policy) in policies.iter_mut().enumerate() {
                    policy.name = format!("np{i}");
                }
                (
                    Cluster {
                        namespaces,
                        pods,
                        policies,
                    },
                    nodes,
                )
            })
    })
}

fn address() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        4 => (0..=15u8).prop_map(|h| Ipv4Addr::new(10, 32, 0, h)),
        1 => (1..=4u8).prop_map(|h| Ipv4Addr::new(192, 168, 1, h)),
        1 => prop::sample::select(vec![
            Ipv4Addr::new(8, 8, 8, 8), Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST,
        ]),
    ]
}

/// A packet whose ends are mostly the cluster's own pods (`Index`es into
/// its pod addresses) and whose port is often one of the destination's
/// container ports (what named ports resolve to), resolved by
/// `Probe::packet`.
#[derive(Clone, Debug)]
struct Probe {
    src: Result<prop::sample::Index, Ipv4Addr>,
    dst: Result<prop::sample::Index, Ipv4Addr>,
    protocol: u8,
    dst_port: u16,
    container_port: Option<prop::sample::Index>,
    from_node: bool,
}

fn end() -> impl Strategy<Value = Result<prop::sample::Index, Ipv4Addr>> {
    prop_oneof![3 => any::<prop::sample::Index>().prop_map(Ok), 1 => address().prop_map(Err)]
}

fn probe() -> impl Strategy<Value = Probe> {
    let port = prop::sample::select(vec![
        0u16, 1, 2, 52, 53, 54, 79, 80, 81, 82, 442, 443, 444, 8079, 8080, 8081, 65534, 65535,
    ]);
    let protocol = prop::sample::select(vec![6u8, 6, 17, 132, 1]);
    let container_port = prop::option::of(any::<prop::sample::Index>());
    (
        end(),
        end(),
        protocol,
        port,
        container_port,
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(src, dst, protocol, dst_port, container_port, from_node)| Probe {
                src,
                dst,
                protocol,
                dst_port,
                container_port,
                from_node,
            },
        )
}

impl Probe {
    fn packet(&self, cluster: &Cluster) -> Packet {
        let addrs: Vec<Ipv4Addr> = cluster.pods.iter().filter_map(|p| p.ip).collect();
        let resolve = |end: &Result<prop::sample::Index, Ipv4Addr>| match end {
            Ok(index) if !addrs.is_empty() => *index.get(&addrs),
            Ok(_) => Ipv4Addr::new(10, 32, 0, 1),
            Err(ip) => *ip,
        };
        let dst = resolve(&self.dst);
        let ports = cluster
            .pods
            .iter()
            .filter(|p| p.ip == Some(dst))
            .flat_map(|p| &p.ports);
        let ports: Vec<&ContainerPort> = ports.collect();
        let (protocol, dst_port) = match &self.container_port {
            Some(index) if !ports.is_empty() => {
                let port = index.get(&ports);
                (port.protocol.number(), port.port)
            }
            _ => (self.protocol, self.dst_port),
        };
        Packet {
            src: resolve(&self.src),
            dst,
            protocol,
            dst_port,
            from_node: self.from_node,
        }
    }
}

/// Each node's rules, compiled from the pods placed on it.
fn per_node(cluster: &Cluster, nodes: &[u8]) -> Vec<RuleSet> {
    let node_of: BTreeMap<&str, u8> = cluster
        .pods
        .iter()
        .zip(nodes)
        .map(|(p, &n)| (p.name.as_str(), n))
        .collect();
    (0..NODES)
        .map(|node| compile(cluster, |pod| node_of.get(pod.name.as_str()) == Some(&node)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_rules_decide_as_the_reference(
        (cluster, nodes) in scenario(),
        probes in prop::collection::vec(probe(), 48),
    ) {
        let whole = compile(&cluster, |_| true);
        let split = per_node(&cluster, &nodes);
        let node_of = |ip: Ipv4Addr| cluster.pod_at(ip).and_then(|pod| {
            cluster.pods.iter().position(|p| std::ptr::eq(p, pod)).map(|i| nodes[i])
        });
        for probe in &probes {
            let packet = &probe.packet(&cluster);
            let verdict = allowed(&cluster, packet);
            prop_assert_eq!(whole.egress_allows(packet), verdict.egress.allowed, "egress {:?}", packet);
            prop_assert_eq!(whole.ingress_allows(packet), verdict.ingress.allowed, "ingress {:?}", packet);
            // The source's node decides egress, the destination's ingress...
            if let Some(node) = node_of(packet.src) {
                prop_assert_eq!(split[usize::from(node)].egress_allows(packet), verdict.egress.allowed);
            }
            if let Some(node) = node_of(packet.dst) {
                prop_assert_eq!(split[usize::from(node)].ingress_allows(packet), verdict.ingress.allowed);
            }
            // ...and together the nodes decide as the cluster.
            prop_assert_eq!(split.iter().all(|rules| rules.allows(packet)), verdict.allowed(), "{:?}", packet);
        }
    }

    /// A restarted agent sees the same objects in another order (weave
    /// #3829: valid traffic blocked after restarts): the rules must not
    /// depend on it.
    #[test]
    fn rules_do_not_depend_on_input_order_weave_3829((cluster, _) in scenario()) {
        let mut reversed = cluster.clone();
        reversed.namespaces.reverse();
        reversed.pods.reverse();
        reversed.policies.reverse();
        let rules = compile(&cluster, |_| true);
        prop_assert_eq!(&rules, &compile(&reversed, |_| true));
        let text = serde_json::to_string(&rules).expect("rules serialize");
        let back: RuleSet = serde_json::from_str(&text).expect("rules deserialize");
        prop_assert_eq!(back, rules);
    }

    /// The compiled sets are in the shape interval sets need.
    #[test]
    fn grants_are_sorted_disjoint_and_merged((cluster, _) in scenario()) {
        let rules = compile(&cluster, |_| true);
        for pod in rules.pods.values() {
            for isolation in [&pod.ingress, &pod.egress].into_iter().flatten() {
                for pair in isolation.grants.windows(2) {
                    prop_assert!(pair[0].peers.last < pair[1].peers.first);
                    let touching = u32::from(pair[0].peers.last).checked_add(1) == Some(u32::from(pair[1].peers.first));
                    prop_assert!(!(touching && pair[0].ports == pair[1].ports));
                }
                prop_assert!(isolation.grants.iter().all(|g| !g.ports.is_empty() && g.peers.first <= g.peers.last));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// API objects are untrusted: any string where the API has one (CIDRs,
    /// port names, label keys and values) is an error or a non-match,
    /// never a panic, in validation, the reference and the compiler alike.
    #[test]
    fn arbitrary_strings_never_panic(
        cidr in "\\PC{0,24}|[0-9./:]{0,24}",
        except in prop::collection::vec("\\PC{0,24}|[0-9./:]{0,24}", 0..=2),
        name in "\\PC{0,20}",
        key in "\\PC{0,8}",
        probes in prop::collection::vec(probe(), 8),
    ) {
        let mut pod_labels = BTreeMap::new();
        pod_labels.insert(key.clone(), name.clone());
        let pod = Pod {
            namespace: "ns0".into(),
            name: "p0".into(),
            labels: pod_labels,
            ip: Some(Ipv4Addr::new(10, 32, 0, 1)),
            host_network: false,
            ports: vec![ContainerPort { name: name.clone(), port: 80, protocol: Protocol::Tcp }],
        };
        let selector = LabelSelector {
            match_labels: [(key.clone(), name.clone())].into(),
            match_expressions: vec![Requirement { key, operator: Operator::NotIn, values: vec![name.clone()] }],
        };
        let rule = Rule {
            peers: Some(vec![
                Peer::IpBlock(IpBlock { cidr, except }),
                Peer::Pods { pod_selector: Some(selector.clone()), namespace_selector: Some(selector.clone()) },
            ]),
            ports: Some(vec![PortSpec { protocol: Protocol::Tcp, port: Some(Port::Name(name)), end_port: None }]),
        };
        let policy = Policy {
            namespace: "ns0".into(),
            name: "np0".into(),
            pod_selector: selector,
            policy_types: None,
            ingress: Some(vec![rule.clone()]),
            egress: Some(vec![rule]),
        };
        let cluster = Cluster { namespaces: vec![], pods: vec![pod], policies: vec![policy] };
        let rules = compile(&cluster, |_| true);
        for probe in &probes {
            let packet = probe.packet(&cluster);
            let verdict = allowed(&cluster, &packet);
            prop_assert_eq!(rules.egress_allows(&packet), verdict.egress.allowed);
            prop_assert_eq!(rules.ingress_allows(&packet), verdict.ingress.allowed);
        }
    }
}

/// How much of what the generator makes is the interesting kind.
#[test]
fn the_generator_covers_the_clauses() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut invalid, mut policies, mut isolated, mut allowed_packets, mut packets) =
        (0, 0, 0, 0, 0);
    for _ in 0..300 {
        let (cluster, _) = scenario().new_tree(&mut runner).expect("tree").current();
        policies += cluster.policies.len();
        invalid += cluster.policies.iter().filter(|p| p.fails_closed()).count();
        let rules = compile(&cluster, |_| true);
        isolated += rules
            .pods
            .values()
            .filter(|p| p.ingress.is_some() || p.egress.is_some())
            .count();
        for _ in 0..20 {
            let p = probe()
                .new_tree(&mut runner)
                .expect("tree")
                .current()
                .packet(&cluster);
            packets += 1;
            allowed_packets += usize::from(allowed(&cluster, &p).allowed());
        }
    }
    // Mostly valid policies, isolated pods, and both verdicts.
    assert!(
        invalid * 3 < policies,
        "{invalid} of {policies} policies invalid"
    );
    assert!(isolated > 300, "{isolated} isolated pods");
    eprintln!(
        "{invalid}/{policies} invalid, {isolated} isolated, {allowed_packets}/{packets} allowed"
    );
    assert!(
        allowed_packets * 10 > packets && allowed_packets * 10 < packets * 9,
        "{allowed_packets} of {packets} allowed"
    );
}
