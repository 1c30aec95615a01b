//! deploy/weft.yaml parses into typed objects and says what it should.

mod common;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// (group, resource, names, verbs) of every rule, for exact comparison.
fn rules(rules: &[PolicyRule]) -> BTreeSet<String> {
    rules
        .iter()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default().join(",");
            let names = r.resource_names.clone().unwrap_or_default().join(",");
            let verbs = r.verbs.join(",");
            r.resources
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(move |res| format!("{groups}/{res}[{names}]: {verbs}"))
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn rbac_grants_exactly_what_the_crate_uses() {
    let d = common::load();
    assert_eq!(d.service_accounts.len(), 1);
    let sa = &d.service_accounts[0].metadata;
    assert_eq!(
        (sa.name.as_deref(), sa.namespace.as_deref()),
        (Some("weft"), Some("kube-system"))
    );
    let cluster = rules(d.cluster_roles[0].rules.as_deref().unwrap_or_default());
    assert_eq!(
        cluster,
        set(&["/nodes[]: get,list,watch", "/nodes/status[]: patch"])
    );
    assert_eq!(
        d.roles[0].metadata.namespace.as_deref(),
        Some("kube-system")
    );
    let ns = rules(d.roles[0].rules.as_deref().unwrap_or_default());
    assert_eq!(
        ns,
        set(&[
            "/configmaps[]: create",
            "/configmaps[weft]: get,update",
            // `weft doctor --cluster` lists the weft pods.
            "/pods[]: list",
            "coordination.k8s.io/leases[]: get,create,update",
        ])
    );
    for subjects in [
        d.cluster_role_bindings[0].subjects.clone(),
        d.role_bindings[0].subjects.clone(),
    ] {
        let s = &subjects.unwrap_or_default()[0];
        assert_eq!(
            (s.kind.as_str(), s.name.as_str()),
            ("ServiceAccount", "weft")
        );
        assert_eq!(s.namespace.as_deref(), Some("kube-system"));
    }
}

fn pod_spec() -> PodSpec {
    let d = common::load();
    assert_eq!(d.daemon_sets.len(), 1);
    let ds = &d.daemon_sets[0];
    assert_eq!(ds.metadata.name.as_deref(), Some("weft"));
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let spec = ds.spec.clone().unwrap();
    let strategy = spec.update_strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    spec.template.spec.unwrap()
}

#[test]
fn daemonset_runs_on_every_node_in_the_host_network() {
    let pod = pod_spec();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("weft"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
    assert_eq!(tolerations[0].key, None);
    let paths: BTreeSet<String> = pod
        .volumes
        .unwrap()
        .into_iter()
        .filter_map(|v| v.host_path.map(|h| h.path))
        .collect();
    for p in [
        "/var/lib/weft",
        "/run/weft",
        "/opt/cni/bin",
        "/etc/cni/net.d",
    ] {
        assert!(paths.contains(p), "no hostPath {p}");
    }
}

fn probe_of(c: &Container, live: bool) -> (String, Option<String>, IntOrString) {
    let probe = if live {
        &c.liveness_probe
    } else {
        &c.readiness_probe
    };
    let get = probe.clone().unwrap().http_get.unwrap();
    (get.path.unwrap(), get.host, get.port)
}

#[test]
fn agent_container_probes_env_and_privileges() {
    let pod = pod_spec();
    let c = &pod.containers[0];
    assert_eq!(c.command.clone().unwrap(), ["/weft", "router", "--kube"]);
    let loopback = Some("127.0.0.1".to_string());
    let port = IntOrString::Int(6784);
    assert_eq!(
        probe_of(c, false),
        ("/readyz".into(), loopback.clone(), port.clone())
    );
    assert_eq!(probe_of(c, true), ("/healthz".into(), loopback, port));
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(true));
    assert!(c.resources.clone().unwrap().requests.is_some());
    let env = c.env.clone().unwrap();
    let by_name = |n: &str| env.iter().find(|e| e.name == n).cloned();
    assert!(by_name("IPALLOC_RANGE").unwrap().value.is_some());
    assert!(by_name("CONN_LIMIT").unwrap().value.is_some());
    let node = by_name("WEFT_NODE_NAME").unwrap().value_from.unwrap();
    assert_eq!(node.field_ref.unwrap().field_path, "spec.nodeName");
    let secret = by_name("WEFT_PASSWORD").unwrap().value_from.unwrap();
    let secret = secret.secret_key_ref.unwrap();
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("weft-passwd", "weft-passwd")
    );
    assert_eq!(secret.optional, Some(true));
}

#[test]
fn init_container_installs_the_cni_plugin() {
    let pod = pod_spec();
    let init = &pod.init_containers.unwrap()[0];
    assert_eq!(init.command.clone().unwrap(), ["/weft", "install-cni"]);
    let mounts: BTreeSet<String> = init
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| m.mount_path)
        .collect();
    assert_eq!(mounts, set(&["/etc/cni/net.d", "/opt/cni/bin"]));
}
