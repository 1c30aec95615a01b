//! `weft status`: the human report, in the shape of `weave status`.

use std::fmt::Write;
use weft_core::Status;
use weft_core::connections::LinkState;
use weft_dataplane::status::DataplaneState;

pub fn text(status: &Status, dataplane: &DataplaneState) -> String {
    let mut s = String::new();
    let established = status
        .connections
        .iter()
        .filter(|c| c.state == LinkState::Established)
        .count();
    let reachable = status.peers.iter().filter(|p| p.reachable).count();
    let links: usize = status.peers.iter().map(|p| p.connections).sum();
    let line = |s: &mut String, k: &str, v: String| {
        let _ = writeln!(s, "{k:>15}: {v}");
    };
    line(&mut s, "Version", env!("CARGO_PKG_VERSION").to_string());
    s.push('\n');
    line(&mut s, "Service", "router".into());
    line(
        &mut s,
        "Protocol",
        format!("weft {}", weft_core::wire::VERSION),
    );
    line(
        &mut s,
        "Name",
        format!("{}({})", status.name, status.nickname),
    );
    line(&mut s, "Address", status.address.to_string());
    line(
        &mut s,
        "Encryption",
        if status.encrypted {
            "enabled"
        } else {
            "disabled"
        }
        .into(),
    );
    line(&mut s, "Dataplane", dataplane.describe());
    // Per peer only when it says something: some peer's traffic fell back.
    if dataplane.peers.iter().any(|p| p.reason.is_some()) {
        for p in &dataplane.peers {
            let why = p
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            line(
                &mut s,
                "Peer dataplane",
                format!("{}({}) {}{why}", p.peer, p.nickname, p.dataplane),
            );
        }
    }
    line(
        &mut s,
        "Targets",
        format!("{}", status.connections.len() + status.targets.len()),
    );
    line(
        &mut s,
        "Connections",
        format!(
            "{} ({established} established, {} other)",
            status.connections.len(),
            status.connections.len() - established
        ),
    );
    line(
        &mut s,
        "Peers",
        format!(
            "{} ({reachable} reachable, with {links} established connections)",
            status.peers.len()
        ),
    );
    s.push('\n');
    let ipam = &status.ipam;
    line(&mut s, "Service", "ipam".into());
    let state = if !ipam.errors.is_empty() {
        format!("problem: {}", ipam.errors.join("; "))
    } else if ipam.seeded || ipam.mode == "node-cidr" {
        "ready".into()
    } else {
        "awaiting consensus".into()
    };
    line(&mut s, "Status", state);
    line(&mut s, "Mode", ipam.mode.clone());
    line(&mut s, "Range", ipam.range.to_string());
    if let Some(gw) = ipam.gateway {
        line(&mut s, "Gateway", gw.to_string());
    }
    let (owned, used, free): (u64, u64, u64) = ipam
        .peers
        .iter()
        .filter(|p| p.name == status.name)
        .fold((0, 0, 0), |a, p| {
            (a.0 + p.owned, a.1 + p.used, a.2 + p.free)
        });
    line(
        &mut s,
        "Addresses",
        format!("{owned} owned here, {used} used, {free} free"),
    );
    for p in &ipam.pending {
        line(&mut s, "Pending", format!("{}: {}", p.container, p.reason));
    }
    s
}
