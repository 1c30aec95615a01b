//! `weft`: the node agent and its command-line tools.

mod agent;
mod api;
mod doctor;
mod fastdp_probe;
mod http;
mod install;
mod kernel;
mod known_peers;
mod kubernetes;
mod limit;
mod metrics;
mod offload;
mod report;
mod settings;
mod sleeve;
mod sleeve_gate;
mod store;
mod udp;
mod underlay;

use clap::{Parser, Subcommand, ValueEnum};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "weft", version, about = "weft: a pod network for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (what the DaemonSet starts on every node).
    Router(Box<settings::RouterArgs>),
    /// Show the local agent's status: the report, or peers, connections
    /// or ipam as JSON.
    Status {
        #[arg(value_enum)]
        view: Option<View>,
        /// The agent's status address.
        #[arg(long, env = "WEFT_STATUS_ADDR", default_value = "127.0.0.1:6784")]
        status_addr: SocketAddr,
    },
    /// Reclaim the address space of a peer whose node was removed for good.
    Rmpeer {
        /// Peer name (xxxx:xxxx:xxxx:xxxx) or nickname.
        peer: String,
        /// The agent's local API socket.
        #[arg(long, env = "WEFT_SOCKET", default_value = "/run/weft/weft.sock")]
        socket: PathBuf,
    },
    /// Delete weft's kernel devices (bridge `weft`, `weft-vxlan`), routes,
    /// nftables table and installed CNI files from this node; stop the
    /// agent first. Pods lose the network. Peer identity and allocations
    /// in /var/lib/weft are kept (delete that directory to forget them).
    Reset(install::CniDirs),
    /// Copy the CNI plugin and its conflist onto this node (what the
    /// DaemonSet's init container runs); atomic and idempotent.
    InstallCni(install::InstallArgs),
    /// Check this node's pod network and say what is wrong and how to fix
    /// it: one line per check (ok / warn / FAIL); exit status 0 when all
    /// are ok, 1 with warnings, 2 with failures.
    Doctor(doctor::DoctorArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum View {
    Peers,
    Connections,
    Ipam,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Router(args) => {
            init_logging(args.log_format);
            match agent::run(*args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("weft: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { view, status_addr } => {
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
        Command::InstallCni(args) => install::main(args),
        Command::Doctor(args) => doctor::main(args),
        Command::Reset(dirs) => reset(&dirs),
        Command::Rmpeer { peer, socket } => {
            let request = serde_json::json!({"op": "remove_peer", "peer": peer});
            match api_call(&socket, &request) {
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
    }
}

/// `weft reset`: the kernel state first, then the CNI files, so a pod the
/// runtime still adds meanwhile fails cleanly instead of half-wiring.
fn reset(dirs: &install::CniDirs) -> ExitCode {
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

fn init_logging(format: settings::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: `kubectl logs` and journald show the
    // escape codes as text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        settings::LogFormat::Text => builder.init(),
        settings::LogFormat::Json => builder.json().init(),
    }
}

/// The status code and body of a GET from the agent's status server.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
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

fn api_call(
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
