//! What the agent answers: the local API on a Unix socket (for weft-cni
//! and `weft rmpeer`) and the status server (report, JSON views,
//! Prometheus metrics, probes). Both read values the agent hands them.

pub mod api;
pub mod http;
pub mod known_peers;
pub mod limit;
pub mod metrics;
pub mod report;
