//! Each conversion case, from objects written as the API serves them.

use super::*;
use weft_policy::Problem;

/// An API object from YAML, through JSON as the client decodes it.
fn object<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    let doc: serde_json::Value = serde_saphyr::from_str(yaml).expect("test YAML");
    serde_json::from_value(doc).expect("an object the API could serve")
}

fn policy(spec: &str) -> Converted {
    let yaml = format!("metadata: {{namespace: prod, name: p}}\nspec:\n{spec}");
    policy_of(&object(&yaml)).expect("named policy")
}

fn problems(c: &Converted) -> Vec<Problem> {
    c.policy.problems().into_iter().map(|e| e.problem).collect()
}

fn labels(pairs: &[(&str, &str)]) -> weft_policy::Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn full_policy_converts_field_by_field() {
    let c = policy(
        r#"
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector:
        matchExpressions: [{key: role, operator: In, values: [api, web]}]
      namespaceSelector: {matchLabels: {team: a}}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports:
    - {port: 5432}
    - {protocol: UDP, port: dns}
    - {protocol: SCTP, port: 7000, endPort: 7010}
  egress:
  - {}
"#,
    );
    assert!(c.unreadable.is_empty(), "{:?}", c.unreadable);
    assert!(c.policy.problems().is_empty());
    let p = &c.policy;
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("prod", "p"));
    assert_eq!(p.pod_selector.match_labels, labels(&[("app", "db")]));
    assert_eq!(
        p.policy_types,
        Some(vec![PolicyType::Ingress, PolicyType::Egress])
    );
    let rule = &p.ingress.as_ref().unwrap()[0];
    let peers = rule.peers.as_ref().unwrap();
    assert_eq!(
        peers[0],
        Peer::Pods {
            pod_selector: Some(LabelSelector {
                match_labels: labels(&[]),
                match_expressions: vec![Requirement {
                    key: "role".into(),
                    operator: Operator::In,
                    values: vec!["api".into(), "web".into()],
                }],
            }),
            namespace_selector: Some(LabelSelector {
                match_labels: labels(&[("team", "a")]),
                match_expressions: vec![],
            }),
        }
    );
    assert_eq!(
        peers[1],
        Peer::IpBlock(IpBlock {
            cidr: "10.0.0.0/8".into(),
            except: vec!["10.1.0.0/16".into()],
        })
    );
    let spec = |protocol, port, end_port| PortSpec {
        protocol,
        port: Some(port),
        end_port,
    };
    assert_eq!(
        rule.ports.as_ref().unwrap(),
        &vec![
            spec(Protocol::Tcp, Port::Number(5432), None),
            spec(Protocol::Udp, Port::Name("dns".into()), None),
            spec(Protocol::Sctp, Port::Number(7000), Some(7010)),
        ]
    );
    // `egress: [{}]`: one rule with neither `to` nor `ports` (allow all).
    assert_eq!(p.egress, Some(vec![Rule::default()]));
}

#[test]
fn omitted_and_empty_stay_distinct() {
    let c = policy("  podSelector: {}\n  ingress: []\n");
    assert_eq!(c.policy.pod_selector, LabelSelector::default());
    assert_eq!(c.policy.policy_types, None);
    assert_eq!(c.policy.ingress, Some(vec![]));
    assert_eq!(c.policy.egress, None);
    let c = policy("  podSelector: {}\n  ingress: [{from: [], ports: []}]\n");
    let rule = &c.policy.ingress.unwrap()[0];
    assert_eq!(
        (rule.peers.as_deref(), rule.ports.as_deref()),
        (Some(&[][..]), Some(&[][..]))
    );
}

#[test]
fn a_missing_pod_selector_selects_the_whole_namespace() {
    let c = policy("  policyTypes: [Ingress]\n");
    assert_eq!(c.policy.pod_selector, LabelSelector::default());
}

#[test]
fn unknown_protocol_fails_closed_and_is_named() {
    let c = policy("  podSelector: {}\n  ingress: [{ports: [{protocol: ICMP, port: 80}]}]\n");
    assert_eq!(problems(&c), vec![Problem::PortZero]);
    assert_eq!(
        c.unreadable,
        vec![r#"ingress[0].ports[0].protocol: Some("ICMP")"#]
    );
    // Lower case is not the API's spelling either.
    let c = policy("  podSelector: {}\n  egress: [{ports: [{protocol: tcp}]}]\n");
    assert!(c.policy.fails_closed());
}

#[test]
fn port_numbers_out_of_range_fail_closed() {
    for port in ["70000", "-1"] {
        let c = policy(&format!(
            "  podSelector: {{}}\n  ingress: [{{ports: [{{port: {port}}}]}}]\n"
        ));
        assert_eq!(problems(&c), vec![Problem::PortZero], "port {port}");
        assert_eq!(
            c.unreadable,
            vec![format!("ingress[0].ports[0].port: {port}")]
        );
    }
    let c = policy("  podSelector: {}\n  ingress: [{ports: [{port: 80, endPort: 65536}]}]\n");
    assert_eq!(problems(&c), vec![Problem::PortZero]);
}

#[test]
fn end_port_with_a_named_port_is_a_problem() {
    let c = policy("  podSelector: {}\n  ingress: [{ports: [{port: http, endPort: 90}]}]\n");
    assert_eq!(problems(&c), vec![Problem::EndPortWithoutNumber]);
    assert!(c.unreadable.is_empty());
}

#[test]
fn unknown_operator_fails_closed_and_is_named() {
    let c = policy(
        "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: in, values: [x]}]}}]}]\n",
    );
    assert!(c.policy.fails_closed());
    assert_eq!(
        c.unreadable,
        vec![r#"ingress[0].from[0].podSelector.matchExpressions[0].operator: "in""#]
    );
    // In the policy's own podSelector it selects every pod of the
    // namespace (weft-policy's rule for an unreadable podSelector).
    let c = policy(
        "  podSelector: {matchExpressions: [{key: a, operator: Gt, values: [\"1\"]}]}\n  ingress: [{}]\n",
    );
    assert!(c.policy.fails_closed());
    let pod = Pod {
        namespace: "prod".into(),
        name: "x".into(),
        labels: labels(&[]),
        ip: None,
        host_network: false,
        ports: vec![],
    };
    assert!(c.policy.selects(&pod));
}

#[test]
fn unknown_policy_type_isolates_both_directions_closed() {
    let c = policy("  podSelector: {}\n  policyTypes: [Ingress, Sideways]\n  egress: [{}]\n");
    assert_eq!(
        c.policy.policy_types,
        Some(vec![PolicyType::Ingress, PolicyType::Egress])
    );
    assert!(c.policy.fails_closed());
    assert_eq!(
        c.unreadable,
        vec![r#"policyTypes: ["Ingress", "Sideways"]"#]
    );
}

#[test]
fn ip_block_with_a_selector_is_no_wider_peer() {
    let c = policy(
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 0.0.0.0/0}, podSelector: {}}]}]\n",
    );
    assert_eq!(problems(&c), vec![Problem::BadCidr(String::new())]);
    assert_eq!(c.unreadable.len(), 1);
}

#[test]
fn empty_peer_is_the_models_problem() {
    let c = policy("  podSelector: {}\n  ingress: [{from: [{}]}]\n");
    assert_eq!(problems(&c), vec![Problem::EmptyPeer]);
}

#[test]
fn nameless_policy_is_left_out() {
    let np: NetworkPolicy = object("metadata: {name: p}\nspec: {}\n");
    assert_eq!(policy_of(&np), None);
}

const POD: &str = r#"
metadata:
  namespace: prod
  name: web-1
  labels: {app: web}
spec:
  containers:
  - name: app
    ports:
    - {name: http, containerPort: 8080}
    - {containerPort: 9090, protocol: UDP}
    - {name: odd, containerPort: 1, protocol: ICMP}
    - {name: big, containerPort: 70000}
  - name: dns
    ports: [{name: dns, containerPort: 53, protocol: UDP}]
  initContainers:
  - name: setup
    ports: [{name: setup, containerPort: 1000}]
  - name: proxy
    restartPolicy: Always
    ports: [{name: proxy, containerPort: 15001, protocol: SCTP}]
status:
  phase: Running
  podIP: 10.32.0.5
  podIPs: [{ip: 10.32.0.5}, {ip: "fd00::5"}]
"#;

fn port(name: &str, port: u16, protocol: Protocol) -> ContainerPort {
    ContainerPort {
        name: name.into(),
        port,
        protocol,
    }
}

#[test]
fn pod_keeps_labels_address_and_serving_ports() {
    let pod = pod_of(&object(POD)).unwrap();
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        ("prod", "web-1")
    );
    assert_eq!(pod.labels, labels(&[("app", "web")]));
    assert_eq!(pod.ip, Some(Ipv4Addr::new(10, 32, 0, 5)));
    assert!(!pod.host_network);
    // App containers and sidecars; not the finished init container, not
    // ports the model cannot hold.
    assert_eq!(
        pod.ports,
        vec![
            port("http", 8080, Protocol::Tcp),
            port("", 9090, Protocol::Udp),
            port("dns", 53, Protocol::Udp),
            port("proxy", 15001, Protocol::Sctp),
        ]
    );
}

#[test]
fn pod_address_is_its_first_ipv4() {
    let v6_first = POD.replace(
        "podIPs: [{ip: 10.32.0.5}, {ip: \"fd00::5\"}]",
        "podIPs: [{ip: \"fd00::5\"}, {ip: 10.32.0.6}]",
    );
    assert_eq!(
        pod_of(&object(&v6_first)).unwrap().ip,
        Some(Ipv4Addr::new(10, 32, 0, 6))
    );
    let v6_only = POD
        .replace("podIP: 10.32.0.5", "podIP: \"fd00::5\"")
        .replace(
            "podIPs: [{ip: 10.32.0.5}, {ip: \"fd00::5\"}]",
            "podIPs: [{ip: \"fd00::5\"}]",
        );
    assert_eq!(pod_of(&object(&v6_only)).unwrap().ip, None);
    let garbage = POD
        .replace("podIP: 10.32.0.5", "podIP: \"10.32.0.500\"")
        .replace("{ip: 10.32.0.5}", "{ip: x}");
    assert_eq!(pod_of(&object(&garbage)).unwrap().ip, None);
}

#[test]
fn pending_pod_without_address_is_kept() {
    let pod: KubePod = object(
        "metadata: {namespace: prod, name: new}\nspec: {containers: []}\nstatus: {phase: Pending}\n",
    );
    let pod = pod_of(&pod).unwrap();
    assert_eq!(pod.ip, None);
    let bare: KubePod = object("metadata: {namespace: prod, name: bare}\n");
    assert_eq!(pod_of(&bare).unwrap().ports, vec![]);
}

#[test]
fn host_network_pod_is_marked() {
    let pod: KubePod = object(
        "metadata: {namespace: kube-system, name: weft-x}\nspec: {hostNetwork: true, containers: []}\nstatus: {podIP: 192.168.1.10}\n",
    );
    assert!(pod_of(&pod).unwrap().host_network);
}

#[test]
fn terminated_pods_are_left_out() {
    for phase in ["Succeeded", "Failed"] {
        let pod = POD.replace("phase: Running", &format!("phase: {phase}"));
        assert_eq!(pod_of(&object(&pod)), None, "{phase}");
    }
    let unknown = POD.replace("phase: Running", "phase: Unknown");
    assert!(pod_of(&object(&unknown)).is_some());
}

#[test]
fn namespace_keeps_its_labels() {
    let ns: KubeNamespace = object("metadata: {name: prod, labels: {team: a}}\n");
    assert_eq!(
        namespace_of(&ns),
        Some(Namespace {
            name: "prod".into(),
            labels: labels(&[("team", "a")]),
        })
    );
    assert_eq!(namespace_of(&KubeNamespace::default()), None);
}
