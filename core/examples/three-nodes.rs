//! Three nodes on an in-memory network: they connect and converge, then the
//! link node1–node3 is cut and node1 reaches node3 through node2.
//!
//! `cargo run -p weft-core --features harness --example three-nodes`

use std::time::Duration;
use weft_core::harness::Net;

fn main() {
    let mut net = Net::new(3, 1, |_, _| {});
    net.run_for(Duration::from_secs(5));
    println!("after 5 s: converged = {}", net.converged());
    print_routes(&net, "before the cut");

    net.cut(0, 2);
    net.run_for(Duration::from_secs(10));
    print_routes(&net, "10 s after cutting node1 <-> node3");

    let status = net.router(0).status(net.now);
    println!(
        "\nnode1 status:\n{}",
        serde_json::to_string_pretty(&status).expect("status is JSON")
    );
    for (at, node, event) in net.events.iter().filter(|(_, i, _)| *i == 0) {
        println!("{at} node{} {event:?}", node + 1);
    }
}

fn print_routes(net: &Net, title: &str) {
    println!("\n{title}:");
    for (i, router) in net.running() {
        for (peer, hop) in router.routes().iter() {
            let nick = |p| {
                router
                    .topology()
                    .get(p)
                    .map_or("?".to_string(), |e| e.nickname.clone())
            };
            println!("  node{} -> {:<6} via {}", i + 1, nick(peer), nick(hop));
        }
    }
}
