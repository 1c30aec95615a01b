//! `--report FILE.html`: one self-contained page (no network fetches) that
//! shows a run: the event timeline, the share of nodes converged over
//! time, control traffic over time, and the final topology with relays.

use crate::engine::Sim;
use crate::report::Report;
use std::fmt::Write;

/// Topologies with more nodes are drawn without edges (they would be a
/// solid disc).
const MAX_DRAWN_EDGES_NODES: usize = 60;

pub fn page(sim: &Sim, report: &Report) -> String {
    let mut h = String::new();
    let verdict = if report.passed { "PASS" } else { "FAIL" };
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>weft-sim: {name}</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1000px}}\
         h2{{margin-top:1.6em}} .pass{{color:#176f2c}} .fail{{color:#b00020}}\
         table{{border-collapse:collapse}} td,th{{padding:2px 8px;text-align:left;border-bottom:1px solid #eee}}\
         svg{{background:#fafafa;border:1px solid #ddd}}</style></head><body>\
         <h1>{name} <span class=\"{class}\">{verdict}</span></h1><p>{about}</p>\
         <p>seed {seed} · engine {engine} · converged {conv} after the last disruption · \
         control traffic {bytes} B/s per node · trace {hash}</p>",
        name = esc(&report.scenario),
        class = if report.passed { "pass" } else { "fail" },
        about = esc(sim.scenario.about.as_deref().unwrap_or("")),
        seed = report.seed,
        engine = report.engine,
        conv = report
            .convergence_after_last_disruption_s
            .map_or("never".to_string(), |t| format!("{t:.1} s")),
        bytes = report.gossip_bytes_per_node_per_s,
        hash = report.trace_hash,
    );
    timeline(&mut h, sim, report);
    h.push_str("<h2>Nodes converged</h2>");
    let agreement: Vec<(f64, f64)> = sim
        .samples
        .points()
        .iter()
        .map(|p| (p.at.since_epoch().as_secs_f64(), p.agreement * 100.0))
        .collect();
    chart(
        &mut h,
        &agreement,
        100.0,
        "% of running nodes holding the same peers, connections and ring",
        sim,
    );
    h.push_str("<h2>Control traffic</h2>");
    chart(
        &mut h,
        &traffic(sim),
        0.0,
        "bytes per second per running node",
        sim,
    );
    topology(&mut h, sim);
    h.push_str("</body></html>\n");
    h
}

fn timeline(h: &mut String, sim: &Sim, report: &Report) {
    h.push_str("<h2>Timeline</h2><table><tr><th>time</th><th>what</th></tr>");
    let mut rows: Vec<(f64, String)> = sim
        .scenario
        .events
        .iter()
        .map(|e| {
            (
                e.at.as_secs_f64(),
                format!("{} (line {})", e.action.describe(sim.scenario), e.line),
            )
        })
        .collect();
    for c in &report.checks {
        let at =
            c.at.trim_end_matches('s')
                .parse()
                .unwrap_or(sim.scenario.duration.as_secs_f64());
        let mark = if c.passed {
            "<span class=pass>pass</span>"
        } else {
            "<span class=fail>FAIL</span>"
        };
        rows.push((at, format!("check {} {mark}: {}", c.expect, esc(&c.detail))));
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (t, what) in rows {
        let what = if what.contains("<span") {
            what
        } else {
            esc(&what)
        };
        let _ = write!(h, "<tr><td>{t:.1} s</td><td>{what}</td></tr>");
    }
    h.push_str("</table>");
}

/// Bytes per second per node, between chart points.
fn traffic(sim: &Sim) -> Vec<(f64, f64)> {
    sim.samples
        .points()
        .windows(2)
        .map(|w| {
            let dt = w[1].at.saturating_since(w[0].at).as_secs_f64().max(1e-9);
            let bytes = w[1].sent.saturating_sub(w[0].sent);
            let nodes = sim.nodes.len().max(1) as f64;
            (
                w[1].at.since_epoch().as_secs_f64(),
                bytes as f64 / dt / nodes,
            )
        })
        .collect()
}

/// A line chart of (seconds, value) with event times marked.
fn chart(h: &mut String, points: &[(f64, f64)], fixed_max: f64, label: &str, sim: &Sim) {
    let (w, ht, pad) = (900.0, 200.0, 30.0);
    let t_max = sim.scenario.duration.as_secs_f64().max(1e-9);
    let v_max = if fixed_max > 0.0 {
        fixed_max
    } else {
        points.iter().map(|p| p.1).fold(1.0, f64::max)
    };
    let x = |t: f64| pad + t / t_max * (w - 2.0 * pad);
    let y = |v: f64| ht - pad - v / v_max * (ht - 2.0 * pad);
    let _ = write!(
        h,
        "<svg width=\"{w}\" height=\"{ht}\" role=\"img\" aria-label=\"{}\">",
        esc(label)
    );
    for e in &sim.scenario.events {
        let ex = x(e.at.as_secs_f64());
        let _ = write!(
            h,
            "<line x1=\"{ex:.1}\" y1=\"{pad}\" x2=\"{ex:.1}\" y2=\"{:.1}\" stroke=\"#f0b400\" stroke-dasharray=\"3,3\"/>",
            ht - pad
        );
    }
    let line: Vec<String> = points
        .iter()
        .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
        .collect();
    let _ = write!(
        h,
        "<polyline fill=\"none\" stroke=\"#1f5fbf\" stroke-width=\"1.5\" points=\"{}\"/>\
         <text x=\"{pad}\" y=\"18\" font-size=\"12\">{} (max {v_max:.0})</text>\
         <text x=\"{pad}\" y=\"{:.0}\" font-size=\"11\">0 s</text><text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\">{t_max:.0} s</text></svg>",
        line.join(" "),
        esc(label),
        ht - 8.0,
        w - pad - 30.0,
        ht - 8.0,
    );
}

/// The final topology: nodes on a circle, confirmed connections as lines,
/// and dashed red lines for pairs that reach each other only via a relay.
fn topology(h: &mut String, sim: &Sim) {
    h.push_str("<h2>Final topology</h2>");
    let n = sim.nodes.len();
    let (size, r) = (640.0, 260.0);
    let pos = |i: usize| {
        let a = i as f64 / n.max(1) as f64 * std::f64::consts::TAU;
        (size / 2.0 + r * a.cos(), size / 2.0 + r * a.sin())
    };
    let names: Vec<Option<weft_core::PeerName>> = sim
        .nodes
        .iter()
        .map(|nd| nd.router().map(|r| r.name()))
        .collect();
    let index_of = |p: weft_core::PeerName| names.iter().position(|x| *x == Some(p));
    let _ = write!(
        h,
        "<svg width=\"{size}\" height=\"{size}\" role=\"img\" aria-label=\"final topology\">"
    );
    let (mut direct, mut relayed) = (0, 0);
    for (i, node) in sim.nodes.iter().enumerate() {
        let Some(router) = node.router() else {
            continue;
        };
        let Some(own) = router.topology().get(router.name()) else {
            continue;
        };
        for j in own
            .connections
            .iter()
            .filter_map(|p| index_of(*p))
            .filter(|j| *j > i)
        {
            direct += 1;
            if n <= MAX_DRAWN_EDGES_NODES {
                let ((x1, y1), (x2, y2)) = (pos(i), pos(j));
                let _ = write!(
                    h,
                    "<line class=\"direct\" x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"#888\"/>"
                );
            }
        }
        for (peer, hop) in router.routes().iter() {
            let (Some(j), Some(_)) = (index_of(peer), index_of(hop)) else {
                continue;
            };
            if j > i && hop != peer {
                relayed += 1;
                if n <= MAX_DRAWN_EDGES_NODES {
                    let ((x1, y1), (x2, y2)) = (pos(i), pos(j));
                    let _ = write!(
                        h,
                        "<line class=\"relayed\" x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"#c62828\" stroke-dasharray=\"6,4\"/>"
                    );
                }
            }
        }
    }
    for (i, node) in sim.nodes.iter().enumerate() {
        let (x, y) = pos(i);
        let fill = if node.running() { "#1f5fbf" } else { "#bbb" };
        let _ = write!(
            h,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"7\" fill=\"{fill}\"><title>{}</title></circle>",
            esc(&node.name)
        );
        if n <= MAX_DRAWN_EDGES_NODES {
            let _ = write!(
                h,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>",
                x + 9.0,
                y - 9.0,
                esc(&node.name)
            );
        }
    }
    let _ = write!(
        h,
        "</svg><p>{direct} direct connections (grey), {relayed} node pairs relayed through another node (dashed red); grey dots are nodes not running.</p>"
    );
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
