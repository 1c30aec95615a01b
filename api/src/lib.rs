//! weft's local protocol, defined once for both ends: the agent's Unix
//! socket API (what the CNI plugin and `weft rmpeer` ask, what the agent
//! answers) and its status pages (what `weft status` and `weft doctor`
//! read), with small blocking clients for each. No async runtime: the
//! plugin is a short-lived process and the CLI is synchronous.

pub mod client;
pub mod http;
pub mod socket;
pub mod status;

pub use client::{Client, ClientError};
pub use http::{StatusClient, StatusError};
pub use socket::{Answer, ApiError, Attachment, ErrorKind, NodeStatus, Reply, Request};
