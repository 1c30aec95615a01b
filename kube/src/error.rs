//! One error type for every API-facing call of the crate.

use std::path::PathBuf;

/// What the agent may see go wrong on the Kubernetes side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither in-cluster configuration nor a usable KUBECONFIG was found.
    #[error(
        "no Kubernetes client configuration (not in a pod with a service account, and no usable KUBECONFIG or ~/.kube/config): {0}"
    )]
    Connect(#[source] kube::Error),

    /// An explicitly named kubeconfig file could not be read or used.
    #[error("cannot use kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// An API request failed (network, authorisation, validation, ...).
    #[error("Kubernetes API: {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },

    /// Optimistic-concurrency updates kept losing to other writers.
    #[error("{what}: gave up after {tries} conflicting updates")]
    Conflict { what: String, tries: u32 },

    /// An object in the API holds something this crate cannot use.
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },

    /// An object deploy/weft.yaml creates is not there.
    #[error("{what} does not exist; {hint}")]
    Missing { what: String, hint: String },

    /// Another agent took over a reclaim claim this agent held (after it
    /// stalled, or could not renew in time). The action was stopped or had
    /// run; the new holder runs it again (it is idempotent).
    #[error("lost the claim on Lease {lease}: {detail}")]
    ClaimLost { lease: String, detail: String },

    /// The agent's reclaim action failed; the claim stays open for a retry.
    #[error("reclaiming peer {peer:016x} failed: {source}")]
    ReclaimAction {
        peer: u64,
        #[source]
        source: BoxError,
    },
}

/// The error type a [`crate::ReclaimAction`] returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps a failed API call with a short description of what was attempted.
pub(crate) fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

/// The API status code of a failed call, if the server answered at all.
pub(crate) fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// 409: a create lost to an existing object, or an update lost to a newer
/// resourceVersion. Both mean "someone else wrote first".
pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    status_code(e) == Some(409)
}
