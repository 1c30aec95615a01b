//! `weft`: the node agent and its command-line tools.

//!
//! Three layers: [`agent`] runs the node (it alone holds the router),
//! [`serve`] answers the local API and the status server from what the
//! agent hands it, and [`cli`] holds the commands people and the
//! DaemonSet run against an agent or a node.

mod agent;
mod cli;
mod serve;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "weft", version, about = "weft: a pod network for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (what the DaemonSet starts on every node).
    Router(Box<agent::settings::RouterArgs>),
    /// Show the local agent's status: the report, or peers, connections
    /// or ipam as JSON.
    Status {
        #[arg(value_enum)]
        view: Option<cli::View>,
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
    Reset(cli::install::CniDirs),
    /// Copy the CNI plugin and its conflist onto this node (what the
    /// DaemonSet's init container runs); atomic and idempotent.
    InstallCni(cli::install::InstallArgs),
    /// Check this node's pod network and say what is wrong and how to fix
    /// it: one line per check (ok / warn / FAIL); exit status 0 when all
    /// are ok, 1 with warnings, 2 with failures.
    Doctor(cli::doctor::DoctorArgs),
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
        Command::Status { view, status_addr } => cli::status(status_addr, view),
        Command::InstallCni(args) => cli::install::main(args),
        Command::Doctor(args) => cli::doctor::main(args),
        Command::Reset(dirs) => cli::reset(&dirs),
        Command::Rmpeer { peer, socket } => cli::rmpeer(&socket, &peer),
    }
}

fn init_logging(format: agent::settings::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: `kubectl logs` and journald show the
    // escape codes as text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        agent::settings::LogFormat::Text => builder.init(),
        agent::settings::LogFormat::Json => builder.json().init(),
    }
}
