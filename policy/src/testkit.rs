//! Small builders for the tests of this crate.

use std::net::Ipv4Addr;

use crate::compile::compile;
use crate::model::{
    Cluster, ContainerPort, IpBlock, Labels, Namespace, Peer, Pod, Policy, Port, PortSpec,
    Protocol, Rule,
};
use crate::reference::{Packet, Verdict, allowed};
use crate::selector::LabelSelector;

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        ..LabelSelector::default()
    }
}

pub fn ip(text: &str) -> Ipv4Addr {
    text.parse().expect("test address")
}

pub fn namespace(name: &str, pairs: &[(&str, &str)]) -> Namespace {
    Namespace {
        name: name.into(),
        labels: labels(pairs),
    }
}

pub fn pod(namespace: &str, name: &str, pairs: &[(&str, &str)], addr: &str) -> Pod {
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: labels(pairs),
        ip: Some(ip(addr)),
        host_network: false,
        ports: Vec::new(),
    }
}

pub fn container_port(name: &str, port: u16, protocol: Protocol) -> ContainerPort {
    ContainerPort {
        name: name.into(),
        port,
        protocol,
    }
}

/// A policy selecting `pods` in `namespace`, with nothing else set.
pub fn policy(namespace: &str, name: &str, pods: &[(&str, &str)]) -> Policy {
    Policy {
        namespace: namespace.into(),
        name: name.into(),
        pod_selector: selector(pods),
        policy_types: None,
        ingress: None,
        egress: None,
    }
}

pub fn rule(peers: Vec<Peer>, ports: Vec<PortSpec>) -> Rule {
    Rule {
        peers: Some(peers),
        ports: Some(ports),
    }
}

pub fn pods_peer(pods: Option<&[(&str, &str)]>, namespaces: Option<&[(&str, &str)]>) -> Peer {
    Peer::Pods {
        pod_selector: pods.map(selector),
        namespace_selector: namespaces.map(selector),
    }
}

pub fn block(cidr: &str, except: &[&str]) -> Peer {
    Peer::IpBlock(IpBlock {
        cidr: cidr.into(),
        except: except.iter().map(|e| e.to_string()).collect(),
    })
}

pub fn port(protocol: Protocol, port: Option<Port>, end_port: Option<u16>) -> PortSpec {
    PortSpec {
        protocol,
        port,
        end_port,
    }
}

pub fn tcp(src: &str, dst: &str, dst_port: u16) -> Packet {
    Packet {
        src: ip(src),
        dst: ip(dst),
        protocol: 6,
        dst_port,
        from_node: false,
    }
}

/// The reference verdict, after checking that rules compiled with every
/// pod local decide each direction the same way.
pub fn decide(cluster: &Cluster, packet: &Packet) -> Verdict {
    let verdict = allowed(cluster, packet);
    let rules = compile(cluster, |_| true);
    assert_eq!(
        (rules.egress_allows(packet), rules.ingress_allows(packet)),
        (verdict.egress.allowed, verdict.ingress.allowed),
        "compiled rules disagree with the reference on {packet:?}"
    );
    verdict
}

pub fn allows(cluster: &Cluster, packet: &Packet) -> bool {
    decide(cluster, packet).allowed()
}
