//! weft-sim: replays scenario files (../shared/SCENARIOS.md) against the
//! real weft-core control plane, deterministically from a seed.

pub mod checks;
pub mod engine;
pub mod html;
pub mod kernel;
pub mod network;
pub mod pcap;
pub mod report;
pub mod samples;
pub mod scenario;
pub mod trace;
pub mod turmoil_engine;
mod window;
