//! deploy/weft.yaml as typed k8s-openapi objects, shared by the tests.

#![allow(dead_code)] // each test binary uses a different part

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};

pub const DEPLOY_YAML: &str = include_str!("../../../deploy/weft.yaml");

/// Every document of deploy/weft.yaml, typed.
#[derive(Debug, Default)]
pub struct Deploy {
    pub namespaces: Vec<Namespace>,
    pub config_maps: Vec<ConfigMap>,
    pub service_accounts: Vec<ServiceAccount>,
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
    pub daemon_sets: Vec<DaemonSet>,
}

/// Parses the multi-document YAML; any unknown kind or field type fails.
pub fn load() -> Deploy {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(DEPLOY_YAML).expect("deploy/weft.yaml is valid YAML");
    let mut d = Deploy::default();
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "Namespace" => d.namespaces.push(typed(doc)),
            "ConfigMap" => d.config_maps.push(typed(doc)),
            "ServiceAccount" => d.service_accounts.push(typed(doc)),
            "ClusterRole" => d.cluster_roles.push(typed(doc)),
            "ClusterRoleBinding" => d.cluster_role_bindings.push(typed(doc)),
            "Role" => d.roles.push(typed(doc)),
            "RoleBinding" => d.role_bindings.push(typed(doc)),
            "DaemonSet" => d.daemon_sets.push(typed(doc)),
            other => panic!("unexpected kind {other:?} in deploy/weft.yaml"),
        }
    }
    d
}

fn typed<T: serde::de::DeserializeOwned>(doc: serde_json::Value) -> T {
    let kind = doc["kind"].clone();
    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{kind}: {e}"))
}
