//! Tunables of one node's control plane, with the defaults a cluster gets.

use crate::ipam::{IpamInit, IpamMode};
use ipnet::Ipv4Net;
use std::net::SocketAddr;
use std::time::Duration;

/// Most direct connections one entry can list and still fit one datagram.
pub const MAX_CONN_LIMIT: usize = 128;

/// Configuration of one [`Router`](crate::Router).
#[derive(Clone, Debug)]
pub struct Config {
    /// The node's name as people know it (Kubernetes node name, hostname).
    pub nickname: String,
    /// The underlay address other peers reach this node on (UDP 6783).
    pub address: SocketAddr,
    /// How often a heartbeat goes to every connected peer.
    pub heartbeat_interval: Duration,
    /// A connection with no heartbeat for this long is dead.
    pub dead_after: Duration,
    /// Most heartbeats a node sends per `heartbeat_interval`. With more
    /// connections than this, each connection's heartbeat interval and dead
    /// time stretch in proportion, so that liveness costs a bounded number
    /// of datagrams per node, whatever the cluster size.
    pub heartbeats_per_interval: usize,
    /// First retry delay for an address that does not answer; doubles per
    /// attempt (with jitter) up to `retry_max`.
    pub retry_base: Duration,
    /// Longest retry delay, reached with 100 addresses or more; with fewer
    /// it is cut in proportion (never below twice `retry_base`), so a
    /// node retries few addresses often and many seldom.
    pub retry_max: Duration,
    /// Most peers this node keeps direct connections to.
    pub conn_limit: usize,
    /// How many random peers each push round of news goes to.
    pub gossip_fanout: usize,
    /// How often news is pushed while there is news.
    pub gossip_interval: Duration,
    /// How many rounds each piece of news is pushed before anti-entropy
    /// is left to repair whatever the push missed.
    pub rumor_rounds: u8,
    /// Least time between two anti-entropy exchanges with the same peer.
    pub anti_entropy_interval: Duration,
    /// A peer that is unreachable and that no reachable peer lists as a
    /// connection is forgotten after this long.
    pub forget_after: Duration,
    /// Shared secret: when set, every datagram is encrypted and authenticated.
    pub secret: Option<Vec<u8>>,
    /// The range pod addresses come from (`--ipalloc-range`).
    pub ipalloc_range: Ipv4Net,
    /// Ring (with its seeding mode) or node-cidr.
    pub ipam: IpamMode,
    /// Wall-clock time of this start, since the Unix epoch (the agent's
    /// clock; the simulator's virtual time). The seal epoch is built from
    /// it, so a node started from a restored, older state file still
    /// seals above every earlier start. The core reads no clock itself.
    pub start_clock: Duration,
}

/// Weave's default, kept so that users moving over find what they expect.
pub const DEFAULT_IPALLOC_RANGE: &str = "10.32.0.0/12";

impl Config {
    pub fn new(nickname: impl Into<String>, address: SocketAddr) -> Config {
        Config {
            nickname: nickname.into(),
            address,
            heartbeat_interval: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            heartbeats_per_interval: 25,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            conn_limit: 100,
            gossip_fanout: 3,
            gossip_interval: Duration::from_millis(200),
            rumor_rounds: 3,
            anti_entropy_interval: Duration::from_secs(3),
            forget_after: Duration::from_secs(60),
            secret: None,
            ipalloc_range: DEFAULT_IPALLOC_RANGE.parse().expect("valid default range"),
            ipam: IpamMode::Ring(IpamInit::Consensus(None)),
            start_clock: Duration::ZERO,
        }
    }

    pub fn with_secret(mut self, secret: impl Into<Vec<u8>>) -> Config {
        self.secret = Some(secret.into());
        self
    }

    /// Checks the settings that would otherwise make the node misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.conn_limit == 0 || self.conn_limit > MAX_CONN_LIMIT {
            return Err(ConfigError::ConnLimit(self.conn_limit));
        }
        if self.heartbeat_interval.is_zero() || self.gossip_interval.is_zero() {
            return Err(ConfigError::ZeroInterval);
        }
        if self.dead_after <= self.heartbeat_interval {
            return Err(ConfigError::DeadAfter {
                dead_after: self.dead_after,
                heartbeat: self.heartbeat_interval,
            });
        }
        if self.retry_base.is_zero() || self.retry_max < self.retry_base {
            return Err(ConfigError::Retry);
        }
        if let Some(secret) = &self.secret {
            check_secret(secret)?;
        }
        check_ipalloc_range(self.ipalloc_range)?;
        if self.ipam == IpamMode::Ring(IpamInit::Consensus(Some(0))) {
            return Err(ConfigError::ZeroConsensus);
        }
        Ok(())
    }
}

/// A shared secret the router accepts: not empty (an empty one would
/// look like encryption and be none).
pub fn check_secret(secret: &[u8]) -> Result<(), ConfigError> {
    if secret.is_empty() {
        return Err(ConfigError::EmptySecret);
    }
    Ok(())
}

/// An allocation range the router accepts: a /30 or larger, so that it
/// holds addresses to hand out once the network and broadcast addresses
/// are kept back.
pub fn check_ipalloc_range(range: Ipv4Net) -> Result<(), ConfigError> {
    if range.prefix_len() > 30 {
        return Err(ConfigError::RangeTooSmall(range));
    }
    Ok(())
}

/// A configuration the router refuses, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("connection limit {0} is out of range: use 1..={MAX_CONN_LIMIT}")]
    ConnLimit(usize),
    #[error("heartbeat and gossip intervals must be greater than zero")]
    ZeroInterval,
    #[error(
        "dead-after ({dead_after:?}) must be longer than the heartbeat interval ({heartbeat:?}), \
         or every connection would be declared dead between two heartbeats"
    )]
    DeadAfter {
        dead_after: Duration,
        heartbeat: Duration,
    },
    #[error("retry delays must be greater than zero, and the maximum at least the base")]
    Retry,
    #[error("the shared secret is empty: give a non-empty secret or none at all")]
    EmptySecret,
    #[error("allocation range {0} is too small: use a /30 or larger")]
    RangeTooSmall(Ipv4Net),
    #[error(
        "consensus=0 can never seed the ring: give the number of initial peers, or use observer"
    )]
    ZeroConsensus,
    #[error(
        "the saved state is for allocation range {saved}, but {configured} is configured: \
         use --ipalloc-range {saved}, or remove the data directory to start this node afresh with the new range"
    )]
    RangeChanged { saved: Ipv4Net, configured: Ipv4Net },
    #[error("the saved state breaks the IPAM ring's rules: {0}")]
    InvalidState(crate::ipam::saved::StateError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new("node1", "192.168.1.11:6783".parse().unwrap())
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(config().validate(), Ok(()));
    }

    #[test]
    fn refusals_say_what_to_change() {
        let mut c = config();
        c.conn_limit = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "connection limit 0 is out of range: use 1..=128"
        );
        let mut c = config();
        c.dead_after = c.heartbeat_interval;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "dead-after (1s) must be longer than the heartbeat interval (1s), \
             or every connection would be declared dead between two heartbeats"
        );
        let c = config().with_secret(Vec::new());
        assert_eq!(c.validate(), Err(ConfigError::EmptySecret));
    }
}
