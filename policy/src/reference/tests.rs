//! One test per clause of the API reference, each decided by the reference
//! evaluator and by compiled rules (`testkit::decide` checks they agree).

use crate::model::{Cluster, Policy, PolicyRef, PolicyType, Port, Protocol, Rule};
use crate::reference::Packet;
use crate::selector::{LabelSelector, Operator, Requirement};
use crate::testkit::*;

const WEB: &str = "10.32.0.1";
const DB: &str = "10.32.0.2";
const CLIENT: &str = "10.32.0.3";
const DEV_CLIENT: &str = "10.32.0.4";
const DEV_WEB: &str = "10.32.0.5";
const NODE: &str = "192.168.1.1";
const EXTERNAL: &str = "8.8.8.8";

/// prod (team=a): web, db, client, and a hostNetwork pod labelled like
/// web; dev (team=b): client, web.
fn cluster(policies: Vec<Policy>) -> Cluster {
    let mut web = pod("prod", "web", &[("app", "web")], WEB);
    web.ports = vec![
        container_port("http", 80, Protocol::Tcp),
        container_port("dns", 53, Protocol::Udp),
    ];
    let mut dev_web = pod("dev", "web", &[("app", "web")], DEV_WEB);
    dev_web.ports = vec![container_port("http", 8080, Protocol::Tcp)];
    let mut host = pod("prod", "agent", &[("app", "web")], NODE);
    host.host_network = true;
    host.ports = vec![container_port("http", 80, Protocol::Tcp)];
    Cluster {
        namespaces: vec![
            namespace("prod", &[("team", "a")]),
            namespace("dev", &[("team", "b")]),
        ],
        pods: vec![
            web,
            pod("prod", "db", &[("app", "db")], DB),
            pod("prod", "client", &[("app", "client")], CLIENT),
            pod("dev", "client", &[("app", "client")], DEV_CLIENT),
            dev_web,
            host,
        ],
        policies,
    }
}

fn ingress(mut policy: Policy, rules: Vec<Rule>) -> Policy {
    policy.ingress = Some(rules);
    policy
}

fn egress(mut policy: Policy, rules: Vec<Rule>) -> Policy {
    policy.egress = Some(rules);
    policy
}

fn only_from(peers: Vec<crate::model::Peer>) -> Rule {
    Rule {
        peers: Some(peers),
        ports: None,
    }
}

fn on_ports(ports: Vec<crate::model::PortSpec>) -> Rule {
    Rule {
        peers: None,
        ports: Some(ports),
    }
}

fn tcp_port(number: u16) -> crate::model::PortSpec {
    port(Protocol::Tcp, Some(Port::Number(number)), None)
}

fn named(protocol: Protocol, name: &str) -> crate::model::PortSpec {
    port(protocol, Some(Port::Name(name.into())), None)
}

#[test]
fn no_policies_allow_everything_weave_3761() {
    let c = cluster(vec![]);
    for (src, dst) in [
        (CLIENT, WEB),
        (EXTERNAL, DB),
        (DEV_WEB, EXTERNAL),
        (NODE, DEV_CLIENT),
    ] {
        assert!(allows(&c, &tcp(src, dst, 80)), "{src} -> {dst}");
    }
}

#[test]
fn policy_types_omitted_isolate_ingress_only() {
    // The default-deny form: podSelector {}, nothing else.
    let c = cluster(vec![policy("prod", "deny", &[])]);
    assert!(!allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
    // prod's egress is not isolated, dev's ingress neither.
    assert!(allows(&c, &tcp(WEB, DEV_WEB, 80)));
    assert!(allows(&c, &tcp(WEB, EXTERNAL, 80)));
}

#[test]
fn policy_types_omitted_add_egress_when_egress_rules_are_present() {
    let p = egress(
        policy("prod", "out", &[("app", "web")]),
        vec![on_ports(vec![tcp_port(53)])],
    );
    let c = cluster(vec![p]);
    assert!(allows(&c, &tcp(WEB, EXTERNAL, 53)));
    assert!(!allows(&c, &tcp(WEB, EXTERNAL, 80)));
    // And Ingress too, with no ingress rules: deny all in.
    assert!(!allows(&c, &tcp(CLIENT, WEB, 80)));
}

#[test]
fn policy_types_omitted_with_empty_egress_list_do_not_isolate_egress() {
    let c = cluster(vec![egress(policy("prod", "p", &[("app", "web")]), vec![])]);
    assert!(allows(&c, &tcp(WEB, EXTERNAL, 80)));
    assert!(!allows(&c, &tcp(CLIENT, WEB, 80)));
}

#[test]
fn policy_types_egress_only_leaves_ingress_open() {
    let mut p = policy("prod", "deny-out", &[]);
    p.policy_types = Some(vec![PolicyType::Egress]);
    let c = cluster(vec![p]);
    assert!(!allows(&c, &tcp(WEB, EXTERNAL, 80)));
    assert!(!allows(&c, &tcp(WEB, DB, 80)));
    assert!(allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
    assert!(allows(&c, &tcp(EXTERNAL, DB, 80)));
}

#[test]
fn policy_types_both_with_empty_rules_deny_both_ways() {
    let mut p = policy("prod", "deny-all", &[("app", "web")]);
    p.policy_types = Some(vec![PolicyType::Ingress, PolicyType::Egress]);
    p.egress = Some(vec![]);
    let c = cluster(vec![p]);
    assert!(!allows(&c, &tcp(WEB, DB, 80)));
    assert!(!allows(&c, &tcp(DB, WEB, 80)));
    assert!(allows(&c, &tcp(DB, CLIENT, 80)));
}

#[test]
fn empty_rule_allows_all() {
    // `ingress: [{}]`: the allow-all form, even next to a default deny.
    let c = cluster(vec![
        policy("prod", "deny", &[]),
        ingress(
            policy("prod", "allow", &[("app", "web")]),
            vec![Rule::default()],
        ),
    ]);
    assert!(allows(&c, &tcp(EXTERNAL, WEB, 9)));
    assert!(!allows(&c, &tcp(EXTERNAL, DB, 9)));
    // `from: []` and `ports: []` are as omitted.
    let c = cluster(vec![ingress(
        policy("prod", "allow", &[]),
        vec![rule(vec![], vec![])],
    )]);
    assert!(allows(&c, &tcp(DEV_CLIENT, DB, 1)));
}

#[test]
fn isolation_needs_a_policy_of_the_pods_own_namespace() {
    let c = cluster(vec![policy("dev", "deny", &[("app", "web")])]);
    assert!(allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(CLIENT, DEV_WEB, 80)));
}

#[test]
fn several_policies_allow_the_union() {
    let from_client = only_from(vec![pods_peer(Some(&[("app", "client")]), None)]);
    let from_db = only_from(vec![pods_peer(Some(&[("app", "db")]), None)]);
    let c = cluster(vec![
        ingress(policy("prod", "a", &[("app", "web")]), vec![from_client]),
        ingress(policy("prod", "b", &[]), vec![from_db]),
    ]);
    assert!(allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(allows(&c, &tcp(DB, WEB, 80)));
    assert!(!allows(&c, &tcp(CLIENT, DB, 80)));
    assert!(allows(&c, &tcp(DB, DB, 80)));
}

#[test]
fn pod_selector_peer_means_pods_of_the_policys_namespace() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "web")]),
        vec![only_from(vec![pods_peer(Some(&[("app", "client")]), None)])],
    )]);
    assert!(allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
}

#[test]
fn namespace_selector_peer_means_every_pod_of_matching_namespaces() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "web")]),
        vec![only_from(vec![pods_peer(None, Some(&[("team", "b")]))])],
    )]);
    assert!(allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
    assert!(allows(&c, &tcp(DEV_WEB, WEB, 80)));
    assert!(!allows(&c, &tcp(CLIENT, WEB, 80)));
    // An empty namespaceSelector: every namespace.
    let c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "web")]),
        vec![only_from(vec![pods_peer(None, Some(&[]))])],
    )]);
    assert!(allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(EXTERNAL, WEB, 80)));
}

#[test]
fn both_selectors_in_one_peer_are_anded_in_two_peers_ored() {
    let both = pods_peer(Some(&[("app", "client")]), Some(&[("team", "b")]));
    let c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "web")]),
        vec![only_from(vec![both])],
    )]);
    assert!(allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(DEV_WEB, WEB, 80)));
    assert!(!allows(&c, &tcp(CLIENT, WEB, 80)));
    let either = vec![
        pods_peer(Some(&[("app", "client")]), None),
        pods_peer(None, Some(&[("team", "b")])),
    ];
    let c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "web")]),
        vec![only_from(either)],
    )]);
    assert!(allows(&c, &tcp(DEV_WEB, WEB, 80)));
    assert!(allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(DB, WEB, 80)));
}

#[test]
fn match_expressions_select_peers() {
    let not_client = LabelSelector {
        match_expressions: vec![Requirement {
            key: "app".into(),
            operator: Operator::NotIn,
            values: vec!["client".into()],
        }],
        ..LabelSelector::default()
    };
    let peer = crate::model::Peer::Pods {
        pod_selector: Some(not_client),
        namespace_selector: None,
    };
    let c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "web")]),
        vec![only_from(vec![peer])],
    )]);
    assert!(allows(&c, &tcp(DB, WEB, 80)));
    assert!(!allows(&c, &tcp(CLIENT, WEB, 80)));
}

#[test]
fn ip_block_except_weave_3924() {
    // Egress to everything but two node addresses, the pod's own node
    // among them: both are refused, the rest allowed.
    let mut p = egress(
        policy("prod", "firewall", &[]),
        vec![only_from(vec![block(
            "0.0.0.0/0",
            &["192.168.1.1/32", "192.168.1.2/32"],
        )])],
    );
    p.policy_types = Some(vec![PolicyType::Egress]);
    let c = cluster(vec![p]);
    assert!(!allows(&c, &tcp(WEB, NODE, 10250)));
    assert!(!allows(&c, &tcp(WEB, "192.168.1.2", 10250)));
    assert!(allows(&c, &tcp(WEB, "192.168.1.3", 10250)));
    assert!(allows(&c, &tcp(WEB, EXTERNAL, 443)));
    assert!(allows(&c, &tcp(WEB, "0.0.0.0", 1)));
    assert!(allows(&c, &tcp(WEB, "255.255.255.255", 1)));
}

#[test]
fn ip_block_applies_to_pod_addresses() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "web")]),
        vec![only_from(vec![block("10.32.0.0/29", &["10.32.0.4/30"])])],
    )]);
    assert!(allows(&c, &tcp(DB, WEB, 80)));
    assert!(allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(DEV_WEB, WEB, 80)));
    assert!(!allows(&c, &tcp(EXTERNAL, WEB, 80)));
}

#[test]
fn ip_block_v6_matches_no_v4_address() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[]),
        vec![only_from(vec![block("::/0", &["fd00::/8"])])],
    )]);
    assert!(c.policies[0].problems().is_empty());
    assert!(!allows(&c, &tcp(EXTERNAL, WEB, 80)));
}

#[test]
fn host_network_pods_are_no_targets_and_match_only_ip_blocks() {
    // Selected by labels, yet not isolated.
    let c = cluster(vec![policy("prod", "deny", &[("app", "web")])]);
    assert!(allows(&c, &tcp(CLIENT, NODE, 80)));
    // As a peer, a pod selector does not find it; its node's address does.
    let c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "db")]),
        vec![only_from(vec![pods_peer(Some(&[("app", "web")]), None)])],
    )]);
    assert!(allows(&c, &tcp(WEB, DB, 5432)));
    assert!(!allows(&c, &tcp(NODE, DB, 5432)));
    let c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "db")]),
        vec![only_from(vec![block("192.168.1.0/24", &[])])],
    )]);
    assert!(allows(&c, &tcp(NODE, DB, 5432)));
}

#[test]
fn external_addresses_are_never_isolated_nor_selected() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[]),
        vec![only_from(vec![pods_peer(Some(&[]), Some(&[]))])],
    )]);
    assert!(!allows(&c, &tcp(EXTERNAL, WEB, 80)));
    assert!(allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
    assert!(allows(&c, &tcp(WEB, EXTERNAL, 80)));
    // A pod-range address that no pod holds is external too.
    assert!(!allows(&c, &tcp("10.32.0.99", WEB, 80)));
    assert!(allows(&c, &tcp(WEB, "10.32.0.99", 80)));
}

#[test]
fn numbered_port_protocol_defaults_to_tcp() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[]),
        vec![on_ports(vec![tcp_port(80)])],
    )]);
    assert_eq!(
        crate::model::PortSpec {
            protocol: Default::default(),
            port: None,
            end_port: None
        }
        .protocol,
        Protocol::Tcp
    );
    assert!(allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(CLIENT, WEB, 81)));
    let udp = Packet {
        protocol: 17,
        ..tcp(CLIENT, WEB, 80)
    };
    assert!(!allows(&c, &udp));
}

#[test]
fn port_without_number_is_every_port_of_its_protocol() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[]),
        vec![on_ports(vec![port(Protocol::Udp, None, None)])],
    )]);
    for dst_port in [0, 53, 65535] {
        assert!(allows(
            &c,
            &Packet {
                protocol: 17,
                ..tcp(CLIENT, WEB, dst_port)
            }
        ));
    }
    assert!(!allows(&c, &tcp(CLIENT, WEB, 53)));
    assert!(!allows(
        &c,
        &Packet {
            protocol: 132,
            ..tcp(CLIENT, WEB, 53)
        }
    ));
}

#[test]
fn end_port_is_an_inclusive_range() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[]),
        vec![on_ports(vec![port(
            Protocol::Sctp,
            Some(Port::Number(1000)),
            Some(2000),
        )])],
    )]);
    let sctp = |p| Packet {
        protocol: 132,
        ..tcp(CLIENT, WEB, p)
    };
    assert!(!allows(&c, &sctp(999)));
    assert!(allows(&c, &sctp(1000)));
    assert!(allows(&c, &sctp(2000)));
    assert!(!allows(&c, &sctp(2001)));
}

#[test]
fn rule_without_ports_allows_every_protocol() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[]),
        vec![only_from(vec![pods_peer(Some(&[]), None)])],
    )]);
    let icmp = Packet {
        protocol: 1,
        ..tcp(CLIENT, WEB, 0)
    };
    assert!(allows(&c, &icmp));
    // A rule with ports does not.
    let c = cluster(vec![ingress(
        policy("prod", "p", &[]),
        vec![on_ports(vec![tcp_port(80)])],
    )]);
    assert!(!allows(&c, &icmp));
}

#[test]
fn named_port_ingress_resolves_on_the_selected_pod_weave_3032() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[]),
        vec![on_ports(vec![named(Protocol::Tcp, "http")])],
    )]);
    assert!(allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(CLIENT, WEB, 8080)));
    // db has no port named http: nothing matches, nothing crashes.
    assert!(!allows(&c, &tcp(CLIENT, DB, 80)));
}

#[test]
fn named_port_egress_resolves_on_the_destination_pod_weave_3785() {
    let mut p = egress(
        policy("dev", "out", &[("app", "client")]),
        vec![on_ports(vec![named(Protocol::Tcp, "http")])],
    );
    p.policy_types = Some(vec![PolicyType::Egress]);
    let c = cluster(vec![p]);
    assert!(allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(DEV_CLIENT, WEB, 8080)));
    assert!(allows(&c, &tcp(DEV_CLIENT, DEV_WEB, 8080)));
    assert!(!allows(&c, &tcp(DEV_CLIENT, DEV_WEB, 80)));
    // Not a pod (hostNetwork, external): no name to resolve.
    assert!(!allows(&c, &tcp(DEV_CLIENT, NODE, 80)));
    assert!(!allows(&c, &tcp(DEV_CLIENT, EXTERNAL, 80)));
}

#[test]
fn named_port_egress_reaches_only_the_rules_peers() {
    let mut p = egress(
        policy("dev", "out", &[("app", "client")]),
        vec![rule(
            vec![pods_peer(None, Some(&[("team", "b")]))],
            vec![named(Protocol::Tcp, "http")],
        )],
    );
    p.policy_types = Some(vec![PolicyType::Egress]);
    let c = cluster(vec![p]);
    assert!(allows(&c, &tcp(DEV_CLIENT, DEV_WEB, 8080)));
    assert!(!allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
}

#[test]
fn named_port_needs_the_same_protocol() {
    let c = cluster(vec![ingress(
        policy("prod", "p", &[]),
        vec![on_ports(vec![
            named(Protocol::Tcp, "dns"),
            named(Protocol::Udp, "http"),
        ])],
    )]);
    assert!(!allows(&c, &tcp(CLIENT, WEB, 53)));
    assert!(!allows(
        &c,
        &Packet {
            protocol: 17,
            ..tcp(CLIENT, WEB, 80)
        }
    ));
    let c = cluster(vec![ingress(
        policy("prod", "p", &[]),
        vec![on_ports(vec![named(Protocol::Udp, "dns")])],
    )]);
    assert!(allows(
        &c,
        &Packet {
            protocol: 17,
            ..tcp(CLIENT, WEB, 53)
        }
    ));
}

#[test]
fn any_port_name_is_looked_up_and_none_panics() {
    for name in [
        "",
        "no-such",
        "HTTP",
        "h\u{0}ttp",
        "a-very-long-name-beyond-fifteen",
        "80",
    ] {
        let c = cluster(vec![ingress(
            policy("prod", "p", &[]),
            vec![on_ports(vec![named(Protocol::Tcp, name)])],
        )]);
        assert!(c.policies[0].problems().is_empty(), "{name:?}");
        assert!(!allows(&c, &tcp(CLIENT, WEB, 80)), "{name:?}");
    }
}

#[test]
fn traffic_from_the_pods_node_is_allowed() {
    let mut p = policy("prod", "deny", &[]);
    p.policy_types = Some(vec![PolicyType::Ingress, PolicyType::Egress]);
    let c = cluster(vec![p]);
    let probe = Packet {
        from_node: true,
        ..tcp(NODE, WEB, 8080)
    };
    assert!(allows(&c, &probe));
    // The same address as a mere source is not the node's stack.
    assert!(!allows(&c, &tcp(NODE, WEB, 8080)));
}

#[test]
fn a_policy_that_fails_validation_isolates_and_allows_nothing() {
    // Allow all from everywhere, but one port entry is broken: without the
    // broken entry the list would be empty, i.e. every port.
    let broken = ingress(
        policy("prod", "broken", &[("app", "web")]),
        vec![on_ports(vec![port(
            Protocol::Tcp,
            Some(Port::Number(90)),
            Some(80),
        )])],
    );
    assert!(!broken.problems().is_empty());
    let c = cluster(vec![broken]);
    assert!(!allows(&c, &tcp(CLIENT, WEB, 85)));
    assert!(!allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(allows(&c, &tcp(CLIENT, DB, 80)));
}

#[test]
fn a_policy_with_an_unreadable_pod_selector_isolates_its_namespace() {
    let mut p = ingress(policy("prod", "bad", &[]), vec![Rule::default()]);
    p.pod_selector.match_expressions = vec![Requirement {
        key: "app".into(),
        operator: Operator::In,
        values: vec![],
    }];
    let c = cluster(vec![p]);
    assert!(!allows(&c, &tcp(CLIENT, WEB, 80)));
    assert!(!allows(&c, &tcp(DEV_CLIENT, DB, 80)));
    assert!(allows(&c, &tcp(CLIENT, DEV_WEB, 80)));
}

#[test]
fn a_denial_names_the_policies_that_isolate() {
    let c = cluster(vec![
        ingress(
            policy("prod", "b-web", &[("app", "web")]),
            vec![only_from(vec![pods_peer(Some(&[("app", "db")]), None)])],
        ),
        policy("prod", "a-deny", &[]),
        policy("dev", "other", &[]),
    ]);
    let verdict = decide(&c, &tcp(CLIENT, WEB, 80));
    assert!(!verdict.allowed());
    assert!(verdict.egress.allowed && verdict.egress.isolated_by.is_empty());
    let names: Vec<&str> = verdict
        .ingress
        .isolated_by
        .iter()
        .map(|p: &PolicyRef| p.name.as_str())
        .collect();
    assert_eq!(names, ["a-deny", "b-web"]);
    let rules = crate::compile::compile(&c, |_| true);
    let web = &rules.pods[&ip(WEB)];
    assert_eq!(
        web.ingress.as_ref().map(|i| i.policies.clone()),
        Some(verdict.ingress.isolated_by)
    );
}

#[test]
fn two_pods_with_one_address_the_first_by_name_owns_it() {
    let mut c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "db")]),
        vec![only_from(vec![pods_peer(Some(&[("app", "client")]), None)])],
    )]);
    // A finished pod still listing web's address, named after it.
    c.pods
        .push(pod("prod", "zz-old", &[("app", "client")], WEB));
    assert!(!allows(&c, &tcp(WEB, DB, 5432)));
    c.pods
        .push(pod("prod", "aa-new", &[("app", "client")], WEB));
    assert!(allows(&c, &tcp(WEB, DB, 5432)));
}

#[test]
fn a_namespace_the_cluster_does_not_list_has_no_labels() {
    let mut c = cluster(vec![ingress(
        policy("prod", "p", &[("app", "web")]),
        vec![only_from(vec![pods_peer(None, Some(&[("team", "b")]))])],
    )]);
    c.namespaces.retain(|ns| ns.name != "dev");
    assert!(!allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
    // But "every namespace" still takes it.
    c.policies[0].ingress = Some(vec![only_from(vec![pods_peer(None, Some(&[]))])]);
    assert!(allows(&c, &tcp(DEV_CLIENT, WEB, 80)));
}
