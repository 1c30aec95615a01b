//! `/metrics`: Prometheus metrics (OpenMetrics text), read off the router's
//! status at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use weft_core::Status;
use weft_core::connections::LinkState;
use weft_dataplane::sleeve::gate::{Counters, FrameDrop};
use weft_dataplane::status::DataplaneState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Dataplane {
    dataplane: String,
}

pub struct Metrics {
    registry: Registry,
    peers: Gauge,
    reachable: Gauge,
    connections: Family<State, Gauge>,
    connections_by_dataplane: Family<Dataplane, Gauge>,
    peers_by_dataplane: Family<Dataplane, Gauge>,
    addresses: Family<State, Gauge>,
    gossip_bytes: Family<Direction, Counter>,
    gossip_datagrams: Family<Direction, Counter>,
    gossip_sent_by_kind: Family<Kind, Counter>,
    dropped: Family<Reason, Counter>,
    fallback: Gauge,
    sleeve_frames: Family<Direction, Counter>,
    sleeve_dropped: Family<Reason, Counter>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("weft");
        let m = Metrics {
            peers: Gauge::default(),
            reachable: Gauge::default(),
            connections: Family::default(),
            connections_by_dataplane: Family::default(),
            peers_by_dataplane: Family::default(),
            addresses: Family::default(),
            gossip_bytes: Family::default(),
            gossip_datagrams: Family::default(),
            gossip_sent_by_kind: Family::default(),
            dropped: Family::default(),
            fallback: Gauge::default(),
            sleeve_frames: Family::default(),
            sleeve_dropped: Family::default(),
            registry: Registry::default(),
        };
        registry.register("peers", "Peers known, this node included", m.peers.clone());
        registry.register("peers_reachable", "Peers with a route", m.reachable.clone());
        registry.register(
            "connections",
            "Direct connections by state",
            m.connections.clone(),
        );
        registry.register(
            "connections_dataplane",
            "Established connections by the dataplane carrying pod traffic",
            m.connections_by_dataplane.clone(),
        );
        registry.register(
            "peers_dataplane",
            "Direct neighbours by the dataplane carrying pod traffic to them (with fastdp, peers VXLAN does not reach fall back to the sleeve)",
            m.peers_by_dataplane.clone(),
        );
        registry.register(
            "ipam_addresses",
            "This node's addresses: used, free, and allocations pending",
            m.addresses.clone(),
        );
        registry.register(
            "gossip_bytes",
            "Control-plane bytes",
            m.gossip_bytes.clone(),
        );
        registry.register(
            "gossip_datagrams",
            "Control-plane datagrams",
            m.gossip_datagrams.clone(),
        );
        registry.register(
            "gossip_sent_bytes_by_kind",
            "Control-plane bytes sent, by message kind",
            m.gossip_sent_by_kind.clone(),
        );
        registry.register(
            "datagrams_dropped",
            "Datagrams refused, by reason",
            m.dropped.clone(),
        );
        registry.register(
            "dataplane_fallback",
            "1 when fastdp could not be set up and another dataplane is used",
            m.fallback.clone(),
        );
        registry.register(
            "sleeve_frames",
            "Pod packets the sleeve carried: sent, received (delivered or relayed), relayed",
            m.sleeve_frames.clone(),
        );
        registry.register(
            "sleeve_dropped",
            "Pod packets the sleeve dropped, by reason",
            m.sleeve_dropped.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// Counters follow the router's cumulative numbers.
fn follow(counter: &Counter, value: u64) {
    let now = counter.get();
    if value > now {
        counter.inc_by(value - now);
    }
}

impl Metrics {
    /// `sleeve`: the sleeve's counters, when it runs.
    pub fn render(
        &self,
        status: &Status,
        dataplane: &DataplaneState,
        sleeve: Option<&Counters>,
    ) -> String {
        self.peers.set(status.peers.len() as i64);
        self.reachable
            .set(status.peers.iter().filter(|p| p.reachable).count() as i64);
        for state in [LinkState::Established, LinkState::Pending] {
            let n = status
                .connections
                .iter()
                .filter(|c| c.state == state)
                .count();
            let label = serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            self.connections
                .get_or_create(&State { state: label })
                .set(n as i64);
        }
        let established = status
            .connections
            .iter()
            .filter(|c| c.state == LinkState::Established)
            .count();
        self.connections_by_dataplane
            .get_or_create(&Dataplane {
                dataplane: dataplane.in_use.to_string(),
            })
            .set(established as i64);
        for label in ["fastdp", "sleeve"] {
            let n = dataplane
                .peers
                .iter()
                .filter(|p| p.dataplane == label)
                .count();
            self.peers_by_dataplane
                .get_or_create(&Dataplane {
                    dataplane: label.into(),
                })
                .set(n as i64);
        }
        let mine = status.ipam.peers.iter().find(|p| p.name == status.name);
        let (used, free) = mine.map_or((0, 0), |p| (p.used, p.free));
        for (state, n) in [
            ("used", used),
            ("free", free),
            ("pending", status.ipam.pending.len() as u64),
        ] {
            self.addresses
                .get_or_create(&State {
                    state: state.into(),
                })
                .set(n as i64);
        }
        let t = status.traffic;
        for (direction, bytes, datagrams) in [
            ("in", t.received_bytes, t.received_datagrams),
            ("out", t.sent_bytes, t.sent_datagrams),
        ] {
            let label = Direction {
                direction: direction.into(),
            };
            follow(&self.gossip_bytes.get_or_create(&label), bytes);
            follow(&self.gossip_datagrams.get_or_create(&label), datagrams);
        }
        for (kind, bytes) in t.sent_bytes_by_kind.iter() {
            let label = Kind {
                kind: kind.name().into(),
            };
            follow(&self.gossip_sent_by_kind.get_or_create(&label), bytes);
        }
        for (reason, n) in &status.dropped {
            let label = weft_api::status::drop_reason_name(*reason);
            follow(&self.dropped.get_or_create(&Reason { reason: label }), *n);
        }
        self.fallback.set(i64::from(dataplane.fallback.is_some()));
        if let Some(sleeve) = sleeve {
            self.follow_sleeve(sleeve);
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    fn follow_sleeve(&self, sleeve: &Counters) {
        for (direction, counter) in [
            ("sent", &sleeve.sent),
            ("received", &sleeve.received),
            ("relayed", &sleeve.relayed),
        ] {
            let label = Direction {
                direction: direction.into(),
            };
            let n = counter.load(std::sync::atomic::Ordering::Relaxed);
            follow(&self.sleeve_frames.get_or_create(&label), n);
        }
        for reason in FrameDrop::ALL {
            let label = Reason {
                reason: reason.label().into(),
            };
            follow(
                &self.sleeve_dropped.get_or_create(&label),
                sleeve.dropped(reason),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use weft_core::{Config, Router, Time};

    fn render(sleeve: Option<&Counters>) -> String {
        let config = Config::new("t", "127.0.0.1:6783".parse().unwrap());
        let router = Router::new(config, None, [0; 32], Time::ZERO).unwrap();
        let dataplane = DataplaneState {
            requested: "sleeve".into(),
            in_use: "sleeve".into(),
            fallback: None,
            kernel_error: None,
            egress_problem: None,
            peers: Vec::new(),
        };
        Metrics::default().render(&router.status(Time::ZERO), &dataplane, sleeve)
    }

    #[test]
    fn sleeve_frames_and_drops_by_reason_are_exported() {
        let counters = Counters::default();
        counters.sent.fetch_add(3, Ordering::Relaxed);
        counters.count_drop(FrameDrop::NotConnected);
        counters.count_drops(FrameDrop::WrongAddress, 2);
        let out = render(Some(&counters));
        for line in [
            "weft_sleeve_frames_total{direction=\"sent\"} 3",
            "weft_sleeve_frames_total{direction=\"received\"} 0",
            "weft_sleeve_dropped_total{reason=\"not_connected\"} 1",
            "weft_sleeve_dropped_total{reason=\"wrong_address\"} 2",
            "weft_sleeve_dropped_total{reason=\"replayed\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line:?} in\n{out}");
        }
        // Without a sleeve there is nothing to count.
        assert!(!render(None).contains("weft_sleeve_dropped_total{"));
    }
}
