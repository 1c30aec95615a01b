//! `weft-cni`: the CNI plugin (spec 1.1.0, results down to 0.3.0). The
//! runtime execs it with CNI_* variables and the network configuration on
//! stdin; it asks the local weft agent for an address and wires the pod's
//! veth to the node's bridge. Results and errors go to stdout, logs to
//! `logFile` or stderr.

mod agent;
mod link;
mod spec;

use agent::Agent;
use serde_json::{Value, json};
use spec::{CniError, Command, Env, NetConf, code};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    // For people and `weft doctor`; runtimes never pass arguments.
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("weft-cni {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let env = Env::parse(|k| std::env::var(k).ok());
    let stdin = spec::read_config(std::io::stdin().lock());
    // Before anything can fail on it, the version the error should carry.
    let version = stdin
        .as_deref()
        .ok()
        .and_then(|stdin| serde_json::from_slice::<Value>(stdin).ok())
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| spec::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".into());
    let outcome = env.and_then(|env| run(&env, &stdin?));
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-cni: {} (code {})", e.msg, e.code);
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(json!({
            "cniVersion": "1.1.0",
            "supportedVersions": spec::SUPPORTED,
        })));
    }
    let conf = NetConf::parse(stdin)?;
    conf.allows(env.command)?;
    let log = Log::open(&conf);
    let agent = Agent::new(&conf.socket);
    log.write(&format!(
        "{:?} network={} container={} ifname={} netns={:?}",
        env.command, conf.name, env.container_id, env.ifname, env.netns
    ));
    let result = match env.command {
        Command::Add => add(env, &conf, &agent).map(Some),
        Command::Del => del(env, &agent).map(|()| None),
        Command::Check => check(env, &conf, &agent).map(|()| None),
        Command::Status => status(&agent).map(|()| None),
        Command::Gc => gc(&conf, &agent).map(|()| None),
        Command::Version => unreachable!("answered above"),
    };
    if let Err(e) = &result {
        log.write(&format!(
            "{:?} failed: {} (code {})",
            env.command, e.msg, e.code
        ));
    }
    result
}

fn add(env: &Env, conf: &NetConf, agent: &Agent) -> Result<Value, CniError> {
    let netns = env.netns.as_deref().expect("ADD has CNI_NETNS");
    // Check the namespace before taking an address for it.
    link::check_netns(netns)?;
    let status = agent.status()?;
    let attachment = env.attachment();
    let added = allocate_and_attach(env, conf, &status, agent, netns, &attachment);
    if added.is_err() {
        // A failed ADD keeps no address, nor a request still waiting for
        // one (the runtime retries with a new ADD, or gives up).
        let _ = agent.release(&attachment);
    }
    added
}

fn allocate_and_attach(
    env: &Env,
    conf: &NetConf,
    status: &weft_api::NodeStatus,
    agent: &Agent,
    netns: &std::path::Path,
    attachment: &str,
) -> Result<Value, CniError> {
    let answer = agent.allocate(attachment)?;
    let address = answer.address;
    let gateway = answer
        .gateway
        .ok_or_else(|| CniError::new(code::IO, "the weft agent gave no valid gateway"))?;
    let mtu = conf.mtu.unwrap_or(status.mtu);
    let plan = link::Plan {
        netns,
        bridge: &conf.bridge,
        host_ifname: link::host_ifname(attachment),
        ifname: &env.ifname,
        mtu,
        address,
        gateway,
        hairpin: conf.hairpin_mode,
    };
    Ok(link::attach(&plan)?.result(&conf.cni_version))
}

/// Idempotent: a gone namespace, interface or allocation is success.
fn del(env: &Env, agent: &Agent) -> Result<(), CniError> {
    let attachment = env.attachment();
    let veth = link::host_ifname(&attachment);
    // The agent deletes the veth off our critical path (the kernel takes
    // ~20 ms); without an agent, we do.
    if agent.delete_veth(&veth).is_err() {
        link::remove_host_end(&veth)?;
    }
    agent.release(&attachment)
}

fn check(env: &Env, conf: &NetConf, agent: &Agent) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult in the configuration",
        )
    })?;
    let (want, gateway) = spec::prev_address(prev, &env.ifname).ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("prevResult has no IPv4 address for {}", env.ifname),
        )
    })?;
    let held = agent.check(&env.attachment())?.address;
    if held != want {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("the agent holds {held} for this pod, prevResult says {want}"),
        ));
    }
    let netns = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"))?;
    let seen = link::observe(netns, &env.ifname)?;
    if !seen.addresses.contains(&want) {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("{} holds {:?}, not {want}", env.ifname, seen.addresses),
        ));
    }
    if gateway.is_some() && seen.default_gateway != gateway {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "the pod's default route is via {:?}, not {:?}",
                seen.default_gateway, gateway
            ),
        ));
    }
    Ok(())
}

fn status(agent: &Agent) -> Result<(), CniError> {
    let not_available = |e: CniError| CniError::new(code::NOT_AVAILABLE, e.msg);
    let status = agent.status().map_err(not_available)?;
    if status.ready {
        Ok(())
    } else {
        Err(CniError::new(
            code::NOT_AVAILABLE,
            format!(
                "weft is not ready: {}",
                status.reason.as_deref().unwrap_or("unknown reason")
            ),
        ))
    }
}

/// Releases allocations of attachments the runtime no longer has.
fn gc(conf: &NetConf, agent: &Agent) -> Result<(), CniError> {
    let valid = conf.valid_attachments()?;
    for held in agent.list()? {
        if !valid.contains(&held) {
            let _ = link::remove_host_end(&link::host_ifname(&held));
            agent.release(&held)?;
        }
    }
    Ok(())
}

/// The plugin's log: `logFile`, else stderr; never stdout (the runtime
/// reads results there). `logLevel` "debug" logs every call; the default
/// logs failures only... and calls, since they are few.
struct Log {
    file: Option<std::fs::File>,
}

impl Log {
    fn open(conf: &NetConf) -> Log {
        let quiet = conf.log_level.as_deref() == Some("error");
        let file = conf.log_file.as_ref().and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        Log {
            file: if quiet { None } else { file },
        }
    }

    fn write(&self, line: &str) {
        if let Some(mut f) = self.file.as_ref() {
            let _ = writeln!(f, "weft-cni[{}]: {line}", std::process::id());
        }
    }
}
