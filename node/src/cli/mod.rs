//! The commands people and the DaemonSet run against an agent or a node:
//! status, rmpeer, reset, install-cni and doctor.

pub mod doctor;
pub mod install;

use std::io::{BufRead, BufReader, Read, Write};
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
    match http_get(status_addr, path) {
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
    let request = serde_json::json!({"op": "remove_peer", "peer": peer});
    match api_call(socket, &request) {
        Ok(answer) if answer["ok"] == true => {
            println!("reclaimed {} addresses of {peer}", answer["reclaimed"]);
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!("weft rmpeer: {}", answer["error"]["message"]);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "weft rmpeer: weft agent not reachable at {}: {e}",
                socket.display()
            );
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

/// The status code and body of a GET from the agent's status server.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

pub fn api_call(
    socket: &std::path::Path,
    request: &serde_json::Value,
) -> std::io::Result<serde_json::Value> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    writeln!(stream, "{request}")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
