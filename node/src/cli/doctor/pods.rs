//! `weft doctor --pods`: from inside every local pod's network namespace,
//! is the default route the bridge gateway, and does an ICMP echo reach
//! every other node's pod network? Native (setns, a raw ICMP socket), so it
//! also works from weft's own scratch image, which has no `ip` or `ping`.

use super::checks::Check;
use super::facts::Facts;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long one echo waits for its reply.
const ECHO_WAIT: Duration = Duration::from_secs(1);

/// A local pod, from the agent's allocations.
#[derive(Clone, Debug)]
pub struct LocalPod {
    pub container: String,
    pub address: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
}

/// An address on another node that answers ICMP through the overlay.
#[derive(Clone, Debug)]
pub struct Target {
    pub node: String,
    pub address: Ipv4Addr,
}

/// What was found inside one pod's namespace.
#[derive(Clone, Debug)]
struct Inside {
    default_via: Option<Ipv4Addr>,
    /// Per target: whether it answered.
    reached: Vec<(Target, bool)>,
}

pub fn checks(facts: &Facts) -> Vec<Check> {
    let pods = match local_pods(&facts.socket) {
        Ok(pods) => pods,
        Err(e) => {
            return vec![Check::fail(
                "pods",
                format!("cannot list this node's pods from the agent: {e}"),
                "see the agent line",
            )];
        }
    };
    if pods.is_empty() {
        return vec![Check::ok("pods", "no pods on this node to probe from")];
    }
    let targets = super::remote::targets(facts);
    let found = inspect_namespaces(&pods, &targets);
    pods.iter()
        .map(|pod| verdict(pod, found.get(&pod.address), &targets))
        .collect()
}

fn verdict(pod: &LocalPod, inside: Option<&Inside>, targets: &[Target]) -> Check {
    let check = format!("pod {}", short(&pod.container));
    let Some(inside) = inside else {
        return Check::warn(
            &check,
            format!(
                "{}: no network namespace on this node holds it",
                pod.address
            ),
            "a pod deleted without CNI DEL leaks its address: the runtime's garbage collection (CNI GC) or `weft status ipam` shows it",
        );
    };
    if inside.default_via != pod.gateway {
        return Check::fail(
            &check,
            format!(
                "{}: default route via {}, not the bridge gateway {}",
                pod.address,
                shown(inside.default_via),
                shown(pod.gateway)
            ),
            "something rewrote the pod's routes, or it was wired by another CNI: recreate the pod",
        );
    }
    let missed: Vec<String> = inside
        .reached
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(t, _)| format!("{} ({})", t.node, t.address))
        .collect();
    let reached = inside.reached.len() - missed.len();
    let via = format!(
        "{}: default route via the gateway {}",
        pod.address,
        shown(pod.gateway)
    );
    if !missed.is_empty() {
        return Check::fail(
            &check,
            format!("{via}; no echo reply from {}", missed.join(", ")),
            "see the peers, dataplane and mtu lines; a NetworkPolicy or firewall in the pod's path drops ICMP",
        );
    }
    match targets.len() {
        0 => Check::ok(&check, format!("{via}; no other node to reach")),
        _ => Check::ok(&check, format!("{via}; reaches all {reached} other nodes")),
    }
}

fn shown(a: Option<Ipv4Addr>) -> String {
    a.map_or("none".into(), |a| a.to_string())
}

/// Container IDs are long; their first 12 characters name them.
fn short(container: &str) -> &str {
    let end = container
        .char_indices()
        .nth(12)
        .map_or(container.len(), |(i, _)| i);
    &container[..end]
}

fn local_pods(socket: &Path) -> Result<Vec<LocalPod>, String> {
    let list = weft_api::Client::new(socket)
        .list()
        .map_err(|e| e.to_string())?;
    Ok(list
        .into_iter()
        .map(|a| LocalPod {
            container: a.container_id,
            address: a.address.addr(),
            gateway: a.gateway,
        })
        .collect())
}

/// Network namespaces on this node: named ones (`/run/netns`, where CNI
/// runtimes and `ip netns` put them) and every process's.
fn namespaces() -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.path()));
    let processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            Some(e.path().join("ns/net"))
        });
    let mut seen = std::collections::BTreeSet::new();
    named
        .chain(processes)
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| seen.insert((m.dev(), m.ino())))
                .unwrap_or(false)
        })
        .collect()
}

/// Looks into every namespace at once; those holding a local pod's address
/// are probed from.
fn inspect_namespaces(pods: &[LocalPod], targets: &[Target]) -> BTreeMap<Ipv4Addr, Inside> {
    let handles: Vec<_> = namespaces()
        .into_iter()
        .map(|ns| {
            let pods: Vec<Ipv4Addr> = pods.iter().map(|p| p.address).collect();
            let targets = targets.to_vec();
            std::thread::spawn(move || inspect(&ns, &pods, &targets))
        })
        .collect();
    handles
        .into_iter()
        .filter_map(|h| h.join().ok().flatten())
        .collect()
}

/// Runs on a thread of its own, which it moves into the namespace at `ns`.
fn inspect(ns: &Path, pods: &[Ipv4Addr], targets: &[Target]) -> Option<(Ipv4Addr, Inside)> {
    let file = std::fs::File::open(ns).ok()?;
    // SAFETY: setns on a valid, open namespace file descriptor; it changes
    // only this thread's network namespace, and the thread ends with it.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return None;
    }
    let held = weft_dataplane::underlay::interfaces()
        .into_values()
        .flat_map(|i| i.addrs)
        .map(|a| a.addr())
        .find(|a| pods.contains(a))?;
    let default_via = weft_dataplane::underlay::routes()
        .into_iter()
        .find(|r| {
            r.destination.prefix_len() == 0 && r.table == weft_dataplane::underlay::MAIN_TABLE
        })
        .and_then(|r| r.gateway);
    let reached = targets
        .iter()
        .enumerate()
        .map(|(seq, t)| (t.clone(), echo(held, t.address, seq as u16)))
        .collect();
    Some((
        held,
        Inside {
            default_via,
            reached,
        },
    ))
}

/// One ICMP echo from `from` to `to`: whether the reply came back.
fn echo(from: Ipv4Addr, to: Ipv4Addr, seq: u16) -> bool {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let Ok(socket) = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)) else {
        return false;
    };
    let id = (std::process::id() as u16) ^ seq.rotate_left(8);
    let bound = socket.bind(&SockAddr::from(SocketAddrV4::new(from, 0)));
    // Connected: the kernel passes on only ICMP from `to`.
    let connected = socket.connect(&SockAddr::from(SocketAddrV4::new(to, 0)));
    if bound.is_err() || connected.is_err() || socket.send(&echo_request(id, seq)).is_err() {
        return false;
    }
    let deadline = Instant::now() + ECHO_WAIT;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .is_err()
        {
            return false;
        }
        let Ok(n) = socket.recv(&mut buf) else {
            return false;
        };
        // SAFETY: recv initialised the first n bytes.
        let bytes: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        if is_echo_reply(&bytes, id, seq) {
            return true;
        }
    }
    false
}

/// An ICMP echo request (type 8) with a short payload.
fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"weft doctor");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Whether a raw socket's datagram (IPv4 header first) is our reply.
fn is_echo_reply(datagram: &[u8], id: u16, seq: u16) -> bool {
    let Some(&first) = datagram.first() else {
        return false;
    };
    let icmp = match datagram.get(usize::from(first & 0x0f) * 4..) {
        Some(icmp) if icmp.len() >= 8 => icmp,
        _ => return false,
    };
    icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() && icmp[6..8] == seq.to_be_bytes()
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    !weft_dataplane::sleeve::offload::fold(weft_dataplane::sleeve::offload::sum(bytes, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_a_valid_checksum_and_replies_are_matched() {
        let request = echo_request(0x1234, 7);
        assert_eq!(checksum(&request), 0, "a correct checksum sums to zero");
        let mut reply = vec![0x45u8; 20];
        reply.extend_from_slice(&request);
        reply[20] = 0;
        assert!(is_echo_reply(&reply, 0x1234, 7));
        assert!(!is_echo_reply(&reply, 0x1234, 8));
        for cut in 0..reply.len() {
            let _ = is_echo_reply(&reply[..cut], 0x1234, 7);
        }
        assert!(!is_echo_reply(&[0x4f], 1, 1));
    }

    #[test]
    fn a_pod_whose_route_bypasses_the_gateway_fails() {
        let pod = LocalPod {
            container: "0123456789abcdef".into(),
            address: "10.32.0.5".parse().unwrap(),
            gateway: Some("10.32.0.1".parse().unwrap()),
        };
        let inside = Inside {
            default_via: Some("10.32.0.254".parse().unwrap()),
            reached: Vec::new(),
        };
        let c = verdict(&pod, Some(&inside), &[]);
        assert_eq!(c.level, super::super::Level::Fail);
        assert_eq!(c.check, "pod 0123456789ab");
        assert!(
            c.evidence.contains("not the bridge gateway 10.32.0.1"),
            "{}",
            c.evidence
        );
    }
}
