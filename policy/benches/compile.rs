//! Compiling the rules of a cluster of 1,000 pods in 20 namespaces under
//! 200 policies (every clause kind): one node's 100 pods, and all 1,000.
//! `cargo bench -p weft-policy`.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{Criterion, criterion_group, criterion_main};
use weft_policy::{
    Cluster, ContainerPort, IpBlock, LabelSelector, Namespace, Peer, Pod, Policy, PolicyType, Port,
    PortSpec, Protocol, Rule, compile,
};

const PODS: u32 = 1000;
const POLICIES: u32 = 200;
const NAMESPACES: u32 = 20;

fn selector(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        ..LabelSelector::default()
    }
}

fn spec(port: Port, end_port: Option<u16>) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: Some(port),
        end_port,
    }
}

fn cluster() -> Cluster {
    let namespaces = (0..NAMESPACES)
        .map(|n| Namespace {
            name: format!("ns{n}"),
            labels: [("team".to_string(), format!("t{}", n % 4))].into(),
        })
        .collect();
    let pods = (0..PODS)
        .map(|i| Pod {
            namespace: format!("ns{}", i % NAMESPACES),
            name: format!("pod{i}"),
            labels: [
                ("app".to_string(), format!("app{}", i % 50)),
                ("tier".to_string(), format!("tier{}", i % 3)),
            ]
            .into(),
            ip: Some(Ipv4Addr::from(0x0a20_0000 + i * 7 + 1)),
            host_network: false,
            ports: vec![ContainerPort {
                name: "http".into(),
                port: 8000 + (i % 5) as u16,
                protocol: Protocol::Tcp,
            }],
        })
        .collect();
    let policies = (0..POLICIES).map(policy).collect();
    Cluster {
        namespaces,
        pods,
        policies,
    }
}

/// Policy `i`: selects one app of its namespace; ingress from one app of
/// its namespace, from a team's namespaces' tier, and from a block with
/// holes, on a number, a range and a named port; egress to the pod range
/// on the named port and to the world but the nodes.
fn policy(i: u32) -> Policy {
    let ns = i % NAMESPACES;
    let ingress = Rule {
        peers: Some(vec![
            Peer::Pods {
                pod_selector: Some(selector(&[("app", format!("app{}", (i + 1) % 50))])),
                namespace_selector: None,
            },
            Peer::Pods {
                pod_selector: Some(selector(&[("tier", format!("tier{}", i % 3))])),
                namespace_selector: Some(selector(&[("team", format!("t{}", i % 4))])),
            },
            Peer::IpBlock(IpBlock {
                cidr: "10.32.0.0/20".into(),
                except: vec![format!("10.32.{}.0/24", i % 16)],
            }),
        ]),
        ports: Some(vec![
            spec(Port::Number(443), None),
            spec(Port::Number(9000 + i as u16), Some(9100 + i as u16)),
            spec(Port::Name("http".into()), None),
        ]),
    };
    let egress = vec![
        Rule {
            peers: Some(vec![Peer::IpBlock(IpBlock {
                cidr: "10.32.0.0/16".into(),
                except: vec![],
            })]),
            ports: Some(vec![spec(Port::Name("http".into()), None)]),
        },
        Rule {
            peers: Some(vec![Peer::IpBlock(IpBlock {
                cidr: "0.0.0.0/0".into(),
                except: vec!["192.168.0.0/16".into(), "10.0.0.0/8".into()],
            })]),
            ports: None,
        },
    ];
    Policy {
        namespace: format!("ns{ns}"),
        name: format!("policy{i}"),
        pod_selector: selector(&[("app", format!("app{}", i % 50))]),
        policy_types: Some(vec![PolicyType::Ingress, PolicyType::Egress]),
        ingress: Some(vec![ingress]),
        egress: Some(egress),
    }
}

fn bench(c: &mut Criterion) {
    let cluster = cluster();
    let mut group = c.benchmark_group("compile 1000 pods x 200 policies");
    group.sample_size(20);
    group.bench_function("one node (100 local pods)", |b| {
        b.iter(|| compile(black_box(&cluster), |pod| pod.name.ends_with('7')))
    });
    group.bench_function("all 1000 pods local", |b| {
        b.iter(|| compile(black_box(&cluster), |_| true))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
