//! Building a [`kube::Client`].

use std::path::Path;

use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};

use crate::error::{Error, Result};

/// A client from the environment: `KUBECONFIG` (or `~/.kube/config`) when
/// present, else the in-cluster service account a DaemonSet pod gets.
pub async fn connect() -> Result<Client> {
    Client::try_default().await.map_err(Error::Connect)
}

/// A client from one explicit kubeconfig file (tests, `weft --kubeconfig`).
pub async fn connect_kubeconfig(path: &Path) -> Result<Client> {
    let bad = |e: Box<dyn std::error::Error + Send + Sync>| Error::Kubeconfig {
        path: path.to_path_buf(),
        source: e,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| bad(e.into()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad(e.into()))?;
    Client::try_from(config).map_err(|e| bad(e.into()))
}
