//! The checks of SCENARIOS.md, evaluated against a running simulation.

use crate::engine::{Sim, TRAFFIC_WINDOW};
use crate::kernel::Route;
use crate::scenario::{CheckAt, Expect};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use weft_core::forward::Forward;

/// Most hops a probe follows before it is declared looping.
const MAX_HOPS: usize = 32;

#[derive(Clone, Debug, Serialize)]
pub struct CheckOutcome {
    #[serde(skip)]
    pub index: usize,
    /// Line of the check in the scenario file.
    pub line: usize,
    pub at: String,
    pub expect: String,
    pub passed: bool,
    pub detail: String,
}

pub fn evaluate(sim: &Sim, index: usize) -> CheckOutcome {
    let check = &sim.scenario.checks[index];
    let result = match &check.expect {
        Expect::Converged => converged(sim),
        Expect::UniqueIps => unique_ips(sim).and_then(|_| match &sim.uniqueness_violation {
            Some((t, d)) => Err(format!("violated at {t}: {d}")),
            None => Ok("no address held twice".into()),
        }),
        Expect::Allocated(pods) => allocated(sim, pods.as_deref()),
        Expect::Pending(pods) => pending(sim, pods),
        Expect::Reachable { from, to } => reachable(sim, from.as_deref(), to.as_deref()),
        Expect::Unreachable { from, to } => match probe(sim, from, to) {
            Ok(hops) => Err(format!("{from} -> {to} delivered in {hops} hop(s)")),
            Err(why) => Ok(format!("{from} -> {to} not delivered: {why}")),
        },
        Expect::GossipBytes { max_per_node_per_s } => {
            let rate = sim.gossip_bytes_per_node_per_s();
            let text = format!(
                "{rate:.0} B/s per node over the last {}s (bound {max_per_node_per_s})",
                TRAFFIC_WINDOW.as_secs()
            );
            if rate <= *max_per_node_per_s {
                Ok(text)
            } else {
                Err(text)
            }
        }
    };
    let (passed, detail) = match result {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    CheckOutcome {
        index,
        line: check.line,
        at: match check.at {
            CheckAt::Time(t) => format!("{}s", t.as_secs_f64()),
            CheckAt::End => "end".into(),
            CheckAt::Always => "always".into(),
        },
        expect: name(&check.expect).into(),
        passed,
        detail,
    }
}

pub fn name(e: &Expect) -> &'static str {
    match e {
        Expect::Converged => "converged",
        Expect::UniqueIps => "unique_ips",
        Expect::Allocated(_) => "allocated",
        Expect::Pending(_) => "pending",
        Expect::Reachable { .. } => "reachable",
        Expect::Unreachable { .. } => "unreachable",
        Expect::GossipBytes { .. } => "gossip_bytes",
    }
}

/// Every running node holds the same peers, connections and ring.
pub fn converged(sim: &Sim) -> Result<String, String> {
    let running = sim.nodes.iter().filter(|n| n.running()).count();
    let views: BTreeSet<(u64, u64)> = sim
        .nodes
        .iter()
        .filter_map(|n| n.router())
        .map(|r| (r.topology().summary(), r.ipam().ring_summary()))
        .collect();
    match views.len() {
        0 => Err("no node is running".into()),
        1 => Ok(format!("{running} running nodes agree")),
        n => Err(format!("{n} different views among {running} running nodes")),
    }
}

/// The share of running nodes whose peers, connections and ring match the
/// most common view (1.0 = converged).
pub fn agreement(sim: &Sim) -> f64 {
    let mut views: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    let mut running = 0;
    for r in sim.nodes.iter().filter_map(|n| n.router()) {
        *views
            .entry((r.topology().summary(), r.ipam().ring_summary()))
            .or_default() += 1;
        running += 1;
    }
    let most = views.values().copied().max().unwrap_or(0);
    if running == 0 {
        0.0
    } else {
        most as f64 / running as f64
    }
}

/// No address held by two pods; no address owned by two running peers.
pub fn unique_ips(sim: &Sim) -> Result<String, String> {
    let mut holders: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    // A node's gateway is held as a pod's address is (while the node is
    // down too: its bridge keeps the address).
    let gateways = sim
        .gateways
        .iter()
        .zip(&sim.nodes)
        .filter(|(_, n)| !n.removed)
        .filter_map(|(g, n)| Some((g.as_ref()?, format!("{}'s gateway", n.name))));
    let pods = sim
        .pods
        .iter()
        .filter_map(|(pod, p)| Some((p.address.as_ref()?, pod.clone())));
    for (a, holder) in gateways.chain(pods) {
        if let Some(other) = holders.insert(*a, holder.clone()) {
            return Err(format!("{a} is held by both {other} and {holder}"));
        }
    }
    let mut owned: Vec<(u32, u32, usize)> = sim
        .owned
        .iter()
        .enumerate()
        .filter(|(i, _)| sim.nodes[*i].running())
        .flat_map(|(i, (_, blocks))| {
            blocks
                .iter()
                .map(move |b| (u32::from(b.network()), u32::from(b.broadcast()), i))
        })
        .collect();
    owned.sort_unstable();
    for w in owned.windows(2) {
        if w[1].0 <= w[0].1 && w[0].2 != w[1].2 {
            return Err(format!(
                "{} and {} both own {}",
                sim.nodes[w[0].2].name,
                sim.nodes[w[1].2].name,
                Ipv4Addr::from(w[1].0)
            ));
        }
    }
    Ok("unique".into())
}

fn allocated(sim: &Sim, pods: Option<&[String]>) -> Result<String, String> {
    let names: Vec<&String> = match pods {
        Some(list) => list.iter().collect(),
        None => sim.pods.keys().collect(),
    };
    let missing: Vec<String> = names
        .iter()
        .filter(|p| sim.pods.get(**p).is_none_or(|pod| pod.address.is_none()))
        .map(|p| describe_missing(sim, p))
        .collect();
    if missing.is_empty() {
        Ok(format!("{} pods have an address", names.len()))
    } else {
        Err(format!(
            "{} of {} pods have no address: {}",
            missing.len(),
            names.len(),
            head(&missing)
        ))
    }
}

fn describe_missing(sim: &Sim, pod: &str) -> String {
    match sim.pods.get(pod) {
        None => format!("{pod} (deleted)"),
        Some(p) => match &p.failed {
            Some(e) => format!("{pod} (failed: {e})"),
            None => format!("{pod} (pending on {})", sim.nodes[p.node].name),
        },
    }
}

fn pending(sim: &Sim, pods: &[String]) -> Result<String, String> {
    let holding: Vec<String> = pods
        .iter()
        .filter_map(|p| Some(format!("{p}={}", sim.pods.get(p)?.address?)))
        .collect();
    if holding.is_empty() {
        Ok(format!("{} pods have no address yet", pods.len()))
    } else {
        Err(format!("these pods have an address: {}", head(&holding)))
    }
}

fn reachable(sim: &Sim, from: Option<&str>, to: Option<&str>) -> Result<String, String> {
    // Live pods: those on running nodes.
    let live: Vec<&String> = sim
        .pods
        .iter()
        .filter(|(_, p)| sim.nodes[p.node].running())
        .map(|(n, _)| n)
        .collect();
    let sources: Vec<&str> =
        from.map_or_else(|| live.iter().map(|s| s.as_str()).collect(), |f| vec![f]);
    let targets: Vec<&str> =
        to.map_or_else(|| live.iter().map(|s| s.as_str()).collect(), |t| vec![t]);
    let mut failures = Vec::new();
    let (mut probes, mut most_hops) = (0, 0);
    for s in &sources {
        for t in &targets {
            if s == t {
                continue;
            }
            probes += 1;
            match probe(sim, s, t) {
                Ok(hops) => most_hops = most_hops.max(hops),
                Err(why) => failures.push(format!("{s} -> {t}: {why}")),
            }
        }
    }
    if failures.is_empty() {
        Ok(format!(
            "{probes} probes delivered, the longest over {most_hops} hop(s)"
        ))
    } else {
        Err(format!(
            "{} of {probes} probes not delivered: {}",
            failures.len(),
            head(&failures)
        ))
    }
}

/// Follows a probe hop by hop from the source pod's node, through the
/// simulated network (relays included), to the node holding the target:
/// by the routes the nodes' kernels hold where the engine programs them,
/// else by each router's `forward()`.
pub fn probe(sim: &Sim, from: &str, to: &str) -> Result<usize, String> {
    let src = sim
        .pods
        .get(from)
        .ok_or_else(|| format!("pod {from} does not exist"))?;
    let dst = sim
        .pods
        .get(to)
        .ok_or_else(|| format!("pod {to} does not exist"))?;
    src.address
        .ok_or_else(|| format!("{from} has no address"))?;
    let addr = dst.address.ok_or_else(|| format!("{to} has no address"))?;
    let mut at = src.node;
    for hops in 0..=MAX_HOPS {
        let node = &sim.nodes[at];
        if !node.running() {
            return Err(format!("{} is down", node.name));
        }
        let (underlay, named) = match hop(sim, at, dst.node, addr) {
            Hop::Local if at == dst.node => return Ok(hops),
            Hop::Local => {
                return Err(format!(
                    "{} takes {addr} as local, but {to} is on {}",
                    node.name, sim.nodes[dst.node].name
                ));
            }
            Hop::Unreachable => return Err(format!("{} has no route to {addr}", node.name)),
            Hop::Peer { underlay, named } => (underlay, named),
        };
        let next = sim
            .nodes
            .iter()
            .position(|n| n.address.ip() == underlay)
            .ok_or_else(|| format!("{} forwards to unknown underlay {named}", node.name))?;
        if !sim.network.link_up(at, next) {
            return Err(format!(
                "{} forwards via {}, but that link is down",
                node.name, sim.nodes[next].name
            ));
        }
        at = next;
    }
    Err(format!("more than {MAX_HOPS} hops: a forwarding loop"))
}

/// What a running node does with a packet for a pod address.
enum Hop {
    Local,
    /// To the node at `underlay`, `named` so in messages.
    Peer {
        underlay: IpAddr,
        named: String,
    },
    Unreachable,
}

/// Node `at`'s hop for `addr`, which is on node `dst_node`. A kernel puts
/// on its bridge what no pod route claims; a pod attached there answers,
/// and for an address the node owns but has no pod of, it is taken as
/// local (as `forward()` says), else there is no route.
fn hop(sim: &Sim, at: usize, dst_node: usize, addr: Ipv4Addr) -> Hop {
    let Some(kernels) = &sim.kernels else {
        let Some(router) = sim.nodes[at].router() else {
            return Hop::Unreachable;
        };
        return match router.forward(addr) {
            Forward::Local => Hop::Local,
            Forward::Unreachable => Hop::Unreachable,
            Forward::Peer {
                next_hop, underlay, ..
            } => Hop::Peer {
                underlay: underlay.ip(),
                named: format!("{underlay} ({next_hop})"),
            },
        };
    };
    match kernels.route(at, addr) {
        Route::Via(next_hop) => Hop::Peer {
            underlay: next_hop.into(),
            named: next_hop.to_string(),
        },
        Route::Bridge if at == dst_node || owns(sim, at, addr) => Hop::Local,
        Route::Bridge | Route::None => Hop::Unreachable,
    }
}

/// Whether node `i` owns the block `addr` is in.
fn owns(sim: &Sim, i: usize, addr: Ipv4Addr) -> bool {
    sim.owned[i].1.iter().any(|b| b.contains(&addr))
}

fn head(items: &[String]) -> String {
    let mut s = items.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > 5 {
        s.push_str(&format!("; and {} more", items.len() - 5));
    }
    s
}
