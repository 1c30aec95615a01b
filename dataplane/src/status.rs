//! What the data path tells the status pages: which overlay carries pod
//! traffic, and what went wrong setting it up.

use serde::{Deserialize, Serialize};

/// Which dataplane carries pod traffic, and why not the one asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneState {
    /// "fastdp", "sleeve" or "none".
    pub requested: String,
    pub in_use: String,
    /// Why the requested dataplane is not in use.
    pub fallback: Option<String>,
    /// The last error programming the kernel, if the last attempt failed.
    pub kernel_error: Option<String>,
    /// Why pods cannot reach addresses outside the cluster, if they cannot.
    pub egress_problem: Option<String>,
    /// Per direct neighbour, with fastdp: whether VXLAN reaches it or its
    /// pods' traffic fell back to the sleeve, and why. Filled in when
    /// status is asked for.
    pub peers: Vec<crate::probe::PeerDataplane>,
}

impl DataplaneState {
    /// Nothing in use yet.
    pub fn new(requested: &str) -> DataplaneState {
        DataplaneState {
            requested: requested.into(),
            in_use: "none".into(),
            fallback: None,
            kernel_error: None,
            egress_problem: None,
            peers: Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        match &self.fallback {
            None => self.in_use.to_string(),
            Some(why) => format!("{} (fell back from {}: {why})", self.in_use, self.requested),
        }
    }
}
