//! deploy/weft.yaml parses into typed objects and says what it should.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_kube::names::{CONFIGMAP, NAMESPACE};

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

/// The rules of every Role, by namespace.
fn role_rules(d: &common::Deploy) -> BTreeMap<String, BTreeSet<String>> {
    d.roles
        .iter()
        .map(|r| {
            let ns = r.metadata.namespace.clone().unwrap_or_default();
            (ns, rules(r.rules.as_deref().unwrap_or_default()))
        })
        .collect()
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
        set(&[
            "/nodes[]: get,list,watch",
            "/nodes/status[]: patch",
            // publish_cluster (NetworkPolicy inputs); cluster_health lists pods.
            "/pods[]: list,watch",
            "/namespaces[]: list,watch",
            "networking.k8s.io/networkpolicies[]: list,watch",
        ])
    );
    let by_ns = role_rules(&d);
    let want: BTreeMap<String, BTreeSet<String>> = [(
        NAMESPACE.to_string(),
        set(&[
            // NameMap: read-modify-write of the one map.
            "/configmaps[weft]: get,update",
            // Reclaimer: create a claim, read it, renew/take over/mark done.
            "coordination.k8s.io/leases[]: get,create,update",
        ]),
    )]
    .into();
    assert_eq!(by_ns, want);
    let bindings = d.cluster_role_bindings.iter().map(|b| &b.subjects);
    for subjects in bindings.chain(d.role_bindings.iter().map(|b| &b.subjects)) {
        let s = &subjects.clone().unwrap_or_default()[0];
        assert_eq!(
            (s.kind.as_str(), s.name.as_str()),
            ("ServiceAccount", "weft")
        );
        assert_eq!(s.namespace.as_deref(), Some("kube-system"));
    }
    let bound: BTreeSet<String> = d
        .role_bindings
        .iter()
        .filter_map(|b| b.metadata.namespace.clone())
        .collect();
    assert_eq!(bound, by_ns.keys().cloned().collect());
}

/// Leases and ConfigMaps of other components (the controller-manager's and
/// scheduler's leader election, kubeadm's config) are out of reach: a rule
/// on them names its objects, or sits in a namespace the manifest creates
/// for weft alone.
#[test]
fn lease_and_configmap_rules_are_named_or_in_weft_namespace() {
    let d = common::load();
    let owned: BTreeSet<String> = d
        .namespaces
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let sensitive = |r: &PolicyRule| {
        r.resources
            .iter()
            .flatten()
            .any(|res| matches!(res.as_str(), "leases" | "configmaps" | "*"))
    };
    let named = |r: &PolicyRule| r.resource_names.as_ref().is_some_and(|n| !n.is_empty());
    for role in &d.cluster_roles {
        for r in role.rules.iter().flatten().filter(|r| sensitive(r)) {
            assert!(
                named(r),
                "cluster-wide rule on {:?} without resourceNames",
                r.resources
            );
        }
    }
    for role in &d.roles {
        let ns = role.metadata.namespace.clone().unwrap_or_default();
        for r in role.rules.iter().flatten().filter(|r| sensitive(r)) {
            assert!(
                named(r) || owned.contains(&ns),
                "rule on {:?} in {ns} without resourceNames",
                r.resources
            );
        }
    }
    for role in d
        .roles
        .iter()
        .map(|r| &r.rules)
        .chain(d.cluster_roles.iter().map(|r| &r.rules))
    {
        for r in role.iter().flatten() {
            assert!(!r.verbs.iter().any(|v| v == "*"), "wildcard verb in {r:?}");
        }
    }
    assert_eq!(owned, set(&[NAMESPACE]), "weft's own namespace");
    // No `create` on ConfigMaps: the manifest creates the map itself.
    let map = d
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(CONFIGMAP));
    assert_eq!(map.unwrap().metadata.namespace.as_deref(), Some(NAMESPACE));
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
        // Writable net sysctls and the sleeve's TUN device without privileged.
        "/proc/sys/net",
        "/dev/net/tun",
        // The pods' network namespaces, for `weft doctor --pods`.
        "/run/netns",
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
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    // Exactly what the agent and `weft doctor --pods` use (see the
    // manifest's comment and README).
    assert_eq!(caps.add.unwrap(), ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]);
    let resources = c.resources.clone().unwrap();
    let requests = resources.requests.unwrap();
    let limits = resources.limits.unwrap();
    assert!(requests.contains_key("cpu"));
    let mib = |q: &Quantity| q.0.strip_suffix("Mi").unwrap().parse::<u32>().unwrap();
    let (request, limit) = (mib(&requests["memory"]), mib(&limits["memory"]));
    // Measured RSS 7.2 MiB (ci/bench-agent-rss.sh, 50 peers): headroom.
    assert!(
        request >= 16 && request <= limit,
        "request {request} Mi, limit {limit} Mi"
    );
    assert!(limit >= 64, "limit {limit} Mi");
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
fn no_container_is_privileged() {
    let pod = pod_spec();
    let all = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    for c in all {
        let sc = c.security_context.clone().unwrap_or_default();
        assert_ne!(sc.privileged, Some(true), "{} is privileged", c.name);
        let caps = sc.capabilities.and_then(|c| c.add).unwrap_or_default();
        assert!(!caps.iter().any(|c| c == "ALL"), "{} adds {caps:?}", c.name);
        // Entering other namespaces is for the doctor in the agent's
        // container only; the installer needs no capability at all.
        if c.name != "weft" {
            assert!(caps.is_empty(), "{} adds {caps:?}", c.name);
        }
    }
    assert_ne!(pod.host_pid, Some(true));
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
