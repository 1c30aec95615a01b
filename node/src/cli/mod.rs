//! The commands people and the DaemonSet run against an agent or a node:
//! status, rmpeer, reset, install-cni and doctor.

pub mod doctor;
pub mod install;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// What `weft status` shows besides the report.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum View {
    Peers,
    Connections,
    Ipam,
}

/// `weft status [VIEW]`: the agent's report, or one view as JSON.
pub fn status(status_addr: SocketAddr, view: Option<View>) -> ExitCode {
    let path = match view {
        None => "/status",
        Some(View::Peers) => "/status/peers",
        Some(View::Connections) => "/status/connections",
        Some(View::Ipam) => "/status/ipam",
    };
    match weft_api::http::get(status_addr, path) {
        Ok((_, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "weft status: cannot reach the agent at {status_addr}: {e} (is `weft router` running on this node?)"
            );
            ExitCode::FAILURE
        }
    }
}

/// `weft rmpeer PEER`: reclaims a removed node's address space.
pub fn rmpeer(socket: &Path, peer: &str) -> ExitCode {
    let client = weft_api::Client::new(socket).with_timeout(Duration::from_secs(30));
    match client.remove_peer(peer) {
        Ok(reclaimed) => {
            println!("reclaimed {reclaimed} addresses of {peer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft rmpeer: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `weft reset`: the kernel state first, then the CNI files, so a pod the
/// runtime still adds meanwhile fails cleanly instead of half-wiring.
pub fn reset(dirs: &install::CniDirs) -> ExitCode {
    use weft_dataplane::Dataplane;
    let kernel = weft_dataplane::LinuxDataplane::new()
        .and_then(|mut d| d.teardown())
        .and_then(|()| weft_dataplane::nftables::remove_masquerade());
    if let Err(e) = kernel {
        eprintln!("weft reset: {e}");
        return ExitCode::FAILURE;
    }
    match install::uninstall(dirs) {
        Ok(removed) => {
            for path in removed {
                println!("weft reset: removed {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft reset: {e}");
            ExitCode::FAILURE
        }
    }
}
