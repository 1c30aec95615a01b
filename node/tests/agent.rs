//! The agent binary against bad input, crashes and restarts: real
//! processes on loopback with `--datapath none` (no kernel changes).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent {
    child: Child,
    udp: SocketAddr,
    status: SocketAddr,
    socket: PathBuf,
}

fn free_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let t = std::net::TcpListener::bind(("127.0.0.1", s.local_addr().unwrap().port()));
    match t {
        Ok(_) => s.local_addr().unwrap().port(),
        Err(_) => free_port(),
    }
}

fn spawn(dir: &Path, extra: &[&str]) -> Agent {
    spawn_with(dir, &dir.join("data"), extra)
}

fn spawn_with(dir: &Path, data: &Path, extra: &[&str]) -> Agent {
    let port = free_port();
    let udp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    spawn_cmd(
        dir,
        data,
        udp,
        udp,
        extra,
        Command::new(env!("CARGO_BIN_EXE_weft")),
    )
}

fn spawn_cmd(
    dir: &Path,
    data: &Path,
    udp: SocketAddr,
    status: SocketAddr,
    extra: &[&str],
    mut command: Command,
) -> Agent {
    let socket = dir.join("weft.sock");
    let child = command
        .args(["router", "--name", "t", "--datapath", "none"])
        .args(["--ipalloc-init", "consensus=1"])
        .arg("--listen")
        .arg(udp.to_string())
        .arg("--status-addr")
        .arg(status.to_string())
        .arg("--data-dir")
        .arg(data)
        .arg("--socket")
        .arg(&socket)
        .args(extra)
        .env_remove("WEFT_PASSWORD")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Agent {
        child,
        udp,
        status,
        socket,
    }
}

impl Agent {
    fn start(data: &Path) -> Agent {
        Agent::ready(spawn(data, &[]))
    }

    fn ready(agent: Agent) -> Agent {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if agent.get("/readyz").0 == 200 {
                return agent;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not ready in 20 s");
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.http(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    fn http(&self, request: &str) -> (u16, String) {
        http_at(self.status, request)
    }

    fn api_raw(&self, line: &[u8]) -> serde_json::Value {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(line).unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }

    fn api(&self, request: serde_json::Value) -> serde_json::Value {
        self.api_raw(format!("{request}\n").as_bytes())
    }

    fn allocate(&self, container: &str) -> String {
        let a = self.api(serde_json::json!({"op": "allocate", "container_id": container}));
        assert_eq!(a["ok"], true, "{a}");
        a["address"].as_str().unwrap().to_string()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// One request to the HTTP server at `addr`: its status code and body.
fn http_at(addr: SocketAddr, request: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (code, body.unwrap_or_default())
}

/// The value of the Prometheus sample whose name and labels are `series`.
fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bad_input_gets_typed_errors_and_never_stops_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    // Garbage on the local API socket.
    let a = agent.api_raw(b"\x00\x01 garbage {\n");
    assert_eq!(a["ok"], false, "{a}");
    assert_eq!(a["error"]["kind"], "bad_request", "{a}");
    let a = agent.api(serde_json::json!({"op": "allocate", "container_id": "bad:id"}));
    assert_eq!(a["error"]["kind"], "refused", "{a}");
    // Unknown paths, methods and non-HTTP bytes on the status port.
    let (code, body) = agent.get("/nope");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("/status"), "{body}");
    assert_eq!(agent.http("DELETE /status HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(agent.http("\u{1}\u{2}\u{3}\r\n\r\n").0, 400);
    // Malformed and forged datagrams on the gossip port.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    // A header of this wire version with a body that is not a message.
    let bad_body = [
        &b"WEFT"[..],
        &[weft_core::wire::VERSION],
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x07\xff\xff\xff",
    ]
    .concat();
    for payload in [&b"hello"[..], &bad_body, &[0u8; 1500][..]] {
        udp.send_to(payload, agent.udp).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = agent.get("/metrics");
        if metric(
            &metrics,
            "weft_datagrams_dropped_total{reason=\"malformed\"}",
        ) >= 3
        {
            break;
        }
        assert!(Instant::now() < deadline, "drops not counted:\n{metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still serving.
    agent.allocate("pod-after-garbage");
    assert_eq!(agent.get("/healthz").0, 200);
}

#[test]
fn control_bytes_are_counted_by_message_kind() {
    let dir = tempfile::tempdir().unwrap();
    // A configured peer that never answers: the agent keeps trying it.
    let silent = format!("127.0.0.1:{}", free_port());
    let agent = spawn(dir.path(), &["--peer", &silent]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = agent.get("/metrics");
        if metric(
            &metrics,
            "weft_gossip_sent_bytes_by_kind_total{kind=\"heartbeat\"}",
        ) > 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "heartbeats not counted:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `--metrics-addr` serves metrics and probes for Prometheus, and none of
/// the status pages, which stay on the status address.
#[test]
fn the_metrics_address_serves_metrics_and_probes_only() {
    let dir = tempfile::tempdir().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent = Agent::ready(spawn(dir.path(), &["--metrics-addr", &metrics.to_string()]));
    let get = |path: &str| http_at(metrics, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
    let (code, body) = get("/metrics");
    assert_eq!(code, 200, "{body}");
    // A lone node counts itself, reachable: the alert on unreachable
    // peers (deploy/monitoring) subtracts one from the other.
    assert_eq!(metric(&body, "weft_peers "), 1, "{body}");
    assert_eq!(metric(&body, "weft_peers_reachable "), 1, "{body}");
    assert_eq!(get("/healthz").0, 200);
    assert_eq!(get("/readyz").0, 200);
    for page in [
        "/status",
        "/status/peers",
        "/status/connections",
        "/status/ipam",
    ] {
        let (code, body) = get(page);
        assert_eq!(code, 404, "{page}: {body}");
        assert_eq!(agent.get(page).0, 200, "{page} on the status address");
    }
}

#[test]
fn allocations_survive_kill_9_and_are_never_handed_out_twice() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let before: Vec<String> = (0..5).map(|i| agent.allocate(&format!("c{i}"))).collect();
    agent.kill9();
    let agent = Agent::start(dir.path());
    for (i, address) in before.iter().enumerate() {
        let a = agent.api(serde_json::json!({"op": "check", "container_id": format!("c{i}")}));
        assert_eq!(a["address"].as_str(), Some(address.as_str()), "{a}");
        // Asking again is idempotent.
        assert_eq!(&agent.allocate(&format!("c{i}")), address);
    }
    let fresh = agent.allocate("c-new");
    assert!(!before.contains(&fresh), "{fresh} handed out twice");
    let list = agent.api(serde_json::json!({"op": "list"}));
    assert_eq!(list["allocations"].as_array().unwrap().len(), 6, "{list}");
}

#[test]
fn a_corrupt_state_file_stops_the_start_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("data/state.json");
    std::fs::create_dir_all(state.parent().unwrap()).unwrap();
    std::fs::write(&state, b"{\"name\": \"not a peer\"").unwrap();
    let agent = spawn(dir.path(), &[]);
    let output = agent_output(agent);
    assert!(!output.0, "started on a corrupt state file");
    assert!(
        output.1.contains("state.json") && output.1.contains("corrupt"),
        "{}",
        output.1
    );
    assert_eq!(std::fs::read(&state).unwrap(), b"{\"name\": \"not a peer\"");
}

#[test]
fn a_saved_state_that_breaks_the_ring_rules_is_refused_by_entry_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    agent.allocate("c1");
    agent.kill9();
    let state = dir.path().join("data/state.json");
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    saved["ipam"]["allocations"]["by_container"]["c1"] = "8.8.8.8".into();
    let edited = serde_json::to_vec_pretty(&saved).unwrap();
    std::fs::write(&state, &edited).unwrap();
    let (ok, stderr) = agent_output(spawn(dir.path(), &[]));
    assert!(!ok, "served 8.8.8.8 from an edited state file");
    assert!(
        stderr.contains("state.json")
            && stderr.contains("allocation \"c1\" -> 8.8.8.8 is outside 10.32.0.0/12")
            && stderr.contains("left untouched"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&state).unwrap(), edited);
}

#[test]
fn the_gateway_survives_sigterm_and_kill_9_and_is_never_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let gateway = |agent: &Agent, container: &str| {
        let a = agent.api(serde_json::json!({"op": "allocate", "container_id": container}));
        assert_eq!(a["ok"], true, "{a}");
        (
            a["address"].as_str().unwrap().to_string(),
            a["gateway"].clone(),
        )
    };
    let (first, before) = gateway(&agent, "c1");
    let mut given = vec![first, gateway(&agent, "c2").0];
    let pid = nix::unistd::Pid::from_raw(agent.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(agent_output(agent).0);
    let agent = Agent::start(dir.path());
    let (third, after_term) = gateway(&agent, "c3");
    given.push(third);
    agent.kill9();
    let agent = Agent::start(dir.path());
    let (fourth, after_kill) = gateway(&agent, "c4");
    given.push(fourth);
    assert_eq!((&after_term, &after_kill), (&before, &before));
    let gateway = before.as_str().unwrap().split('/').next().unwrap();
    assert!(
        given.iter().all(|a| a.split('/').next() != Some(gateway)),
        "the gateway {gateway} went to a pod: {given:?}"
    );
}

#[test]
fn two_agents_cannot_share_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Agent::start(dir.path());
    let other = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let second = spawn_with(other.path(), &data, &[]);
    let (ok, stderr) = agent_output(second);
    assert!(!ok);
    assert!(stderr.contains("in use by another weft agent"), "{stderr}");
}

#[test]
fn state_for_another_range_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    agent.allocate("c1");
    drop(agent);
    let state = dir.path().join("data/state.json");
    let saved = std::fs::read(&state).unwrap();
    let other = spawn(dir.path(), &["--ipalloc-range", "10.64.0.0/12"]);
    let (ok, stderr) = agent_output(other);
    assert!(!ok, "started with another range over saved state");
    assert!(
        stderr.contains(
            "the saved state is for allocation range 10.32.0.0/12, but 10.64.0.0/12 is configured"
        ),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&state).unwrap(), saved, "nothing wiped");
}

#[test]
fn a_range_overlapping_the_service_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = spawn(dir.path(), &["--service-cidr", "10.32.0.0/16"]);
    let (ok, stderr) = agent_output(agent);
    assert!(!ok);
    assert!(
        stderr.contains("the pod range 10.32.0.0/12 collides with this node's network: the service range 10.32.0.0/16 overlaps it"),
        "{stderr}"
    );
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    agent.allocate("c1");
    let pid = nix::unistd::Pid::from_raw(agent.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let socket = agent.socket.clone();
    let (ok, stderr) = agent_output(agent);
    assert!(ok, "{stderr}");
    assert!(!socket.exists());
    assert!(dir.path().join("data/state.json").exists());
}

/// Waits (up to 20 s) for the agent to exit: success, and its stderr.
fn agent_output(mut agent: Agent) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    agent
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.success(), stderr)
}

/// An agent whose open-file limit is `soft` (hard `hard`), as a node's
/// default of 1,024 would be.
fn spawn_limited(dir: &Path, soft: u64, hard: u64) -> Agent {
    use std::os::unix::process::CommandExt;
    let port = free_port();
    let udp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_weft"));
    // SAFETY: setrlimit is async-signal-safe and touches no locks.
    unsafe {
        command.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                .map_err(std::io::Error::from)
        });
    }
    spawn_cmd(dir, &dir.join("data"), udp, udp, &[], command)
}

/// More idle connections than the agent has file descriptors for, from a
/// local user: a new status request and an allocation (which needs a
/// save) still work, and the oldest idle connection was closed.
fn idle_connections_cannot_stop_the_agent(connect: impl Fn(&Agent) -> Box<dyn Read>, cap: usize) {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::ready(spawn_limited(dir.path(), 512, 512));
    let mut idle: Vec<Box<dyn Read>> = (0..1_000).map(|_| connect(&agent)).collect();
    assert_eq!(agent.get("/healthz").0, 200);
    assert_eq!(agent.api(serde_json::json!({"op": "status"}))["ok"], true);
    // Answered after every earlier connection was taken: the agent holds
    // at most the cap of them (plus its own few sockets).
    let sockets = std::fs::read_dir(format!("/proc/{}/fd", agent.child.id()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count();
    assert!(sockets <= cap + 32, "{sockets} sockets held");
    agent.allocate("pod-among-idle-connections");
    assert_eq!(agent.get("/readyz").0, 200);
    let mut byte = [0u8; 1];
    let closed = match idle[0].read(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "the oldest idle connection was kept open");
    idle.clear();
    assert_eq!(agent.get("/healthz").0, 200);
}

#[test]
fn idle_status_connections_beyond_the_fd_limit_cannot_stop_the_agent() {
    idle_connections_cannot_stop_the_agent(
        |agent| {
            let s = TcpStream::connect(agent.status).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            Box::new(s)
        },
        64,
    );
}

#[test]
fn idle_api_connections_beyond_the_fd_limit_cannot_stop_the_agent() {
    idle_connections_cannot_stop_the_agent(
        |agent| {
            let s = UnixStream::connect(&agent.socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            Box::new(s)
        },
        256,
    );
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::ready(spawn_limited(dir.path(), 256, 4096));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["4096", "4096"], "{line}");
}

#[test]
fn failing_saves_answer_unavailable_and_the_agent_recovers_once_they_work() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    agent.allocate("before");
    // The save's temp file cannot be created while a directory holds its
    // name (even for root).
    let blocker = dir.path().join("data/state.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let a = agent.api(serde_json::json!({"op": "allocate", "container_id": "during"}));
    assert_eq!(a["error"]["kind"], "unavailable", "{a}");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot save the node's state"),
        "{a}"
    );
    let (code, body) = agent.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot save"), "{body}");
    // Nothing unsaved was acknowledged: the release is refused too.
    let a = agent.api(serde_json::json!({"op": "release", "container_id": "before"}));
    assert_eq!(a["error"]["kind"], "unavailable", "{a}");
    std::fs::remove_dir(&blocker).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let address = loop {
        let a = agent.api(serde_json::json!({"op": "allocate", "container_id": "during"}));
        if a["ok"] == true {
            break a["address"].as_str().unwrap().to_string();
        }
        assert_eq!(a["error"]["kind"], "unavailable", "{a}");
        assert!(Instant::now() < deadline, "saves did not resume: {a}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let saved = std::fs::read_to_string(dir.path().join("data/state.json")).unwrap();
    assert!(saved.contains("during"), "{saved}");
    assert!(
        saved.contains(address.split('/').next().unwrap()),
        "{saved}"
    );
    assert_eq!(agent.get("/readyz").0, 200);
}

#[test]
fn the_line_limit_is_per_line_not_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let stream = UnixStream::connect(&agent.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    // 5,000 short requests: 80 KB in all, over the 64 KiB line limit.
    for i in 0..5_000 {
        writer.write_all(b"{\"op\":\"status\"}\n").unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        assert!(answer.contains("\"ok\":true"), "request {i}: {answer:?}");
    }
    // One line over the limit is refused.
    let mut long = vec![b' '; 70_000];
    long.push(b'\n');
    let a = agent.api_raw(&long);
    assert_eq!(a["error"]["kind"], "bad_request", "{a}");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request longer than 65536 bytes"),
        "{a}"
    );
}

#[test]
fn the_socket_is_created_private_not_chmodded_after() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let watch = AttribWatch::new(dir.path());
    let agent = Agent::start(dir.path());
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "open to others: {mode:o}");
    // A chmod after bind leaves a moment when the socket is open to all;
    // it shows as an attribute change.
    let changed = watch.names();
    assert!(!changed.contains(&"weft.sock".to_string()), "{changed:?}");
}

/// Names of the entries of a directory whose attributes changed (inotify
/// IN_ATTRIB), from when it was made.
struct AttribWatch(std::os::fd::OwnedFd);

impl AttribWatch {
    fn new(dir: &Path) -> AttribWatch {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: plain system calls on a fresh descriptor we own.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            assert!(fd >= 0);
            assert!(libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_ATTRIB) >= 0);
            AttribWatch(std::os::fd::OwnedFd::from_raw_fd(fd))
        }
    }

    fn names(&self) -> Vec<String> {
        let mut file = std::fs::File::from(self.0.try_clone().unwrap());
        let mut buf = vec![0u8; 64 * 1024];
        let n = file.read(&mut buf).unwrap_or(0);
        let mut names = Vec::new();
        let mut at = 0;
        // struct inotify_event: wd, mask, cookie, len (4 bytes each), name.
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
            let name = &buf[at + 16..at + 16 + len];
            let name = name.split(|b| *b == 0).next().unwrap_or_default();
            names.push(String::from_utf8_lossy(name).into_owned());
            at += 16 + len;
        }
        names
    }
}

#[test]
fn a_failed_start_removes_the_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let udp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let command = Command::new(env!("CARGO_BIN_EXE_weft"));
    let status = taken.local_addr().unwrap();
    let agent = spawn_cmd(
        dir.path(),
        &dir.path().join("data"),
        udp,
        status,
        &[],
        command,
    );
    let socket = agent.socket.clone();
    let (ok, stderr) = agent_output(agent);
    assert!(!ok);
    assert!(stderr.contains("cannot serve status on"), "{stderr}");
    assert!(!socket.exists(), "socket file left behind");
}

#[test]
fn mtus_pods_cannot_use_are_refused_at_start() {
    for (mtu, limit) in [
        ("0", "68..=65535"),
        ("67", "68..=65535"),
        ("70000", "68..=65535"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let agent = spawn(dir.path(), &["--mtu", mtu]);
        let (ok, stderr) = agent_output(agent);
        assert!(!ok, "started with --mtu {mtu}");
        assert!(
            stderr.contains(&format!("--mtu {mtu} is outside {limit}")),
            "{stderr}"
        );
    }
}

#[test]
fn reserved_container_ids_are_refused_and_the_gateway_stays() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    for op in ["release", "allocate", "check"] {
        let a = agent.api(serde_json::json!({"op": op, "container_id": "weft:gateway"}));
        assert_eq!(a["error"]["kind"], "refused", "{op}: {a}");
        assert!(
            a["error"]["message"].as_str().unwrap().contains("reserved"),
            "{op}: {a}"
        );
    }
    assert_eq!(agent.get("/readyz").0, 200, "the gateway was released");
}

#[test]
fn rmpeer_refuses_a_name_that_was_never_a_peer() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let output = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["rmpeer", "dead:beef:0000:0001", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("no peer named dead:beef:0000:0001"),
        "{stderr}"
    );
    let state = std::fs::read_to_string(dir.path().join("data/state.json")).unwrap();
    assert!(
        !state.contains("16045690981097406465"),
        "tombstone written: {state}"
    );
    assert!(
        !state.to_lowercase().contains("dead:beef"),
        "tombstone written: {state}"
    );
}

/// A running agent's answers and status pages read back as the shared
/// protocol types (weft-api), as weft-cni, `weft rmpeer` and `weft doctor`
/// read them; refused datagrams show on the connections page.
#[test]
fn the_agent_answers_in_the_shared_protocol_types() {
    use weft_api::status::DropReason;
    use weft_api::{ClientError, ErrorKind};
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let client = weft_api::Client::new(&agent.socket);
    let a = client.allocate("typed", Duration::from_secs(10)).unwrap();
    assert_eq!(a.container_id, "typed");
    assert_eq!(client.check("typed").unwrap(), a);
    assert!(client.list().unwrap().contains(&a));
    let node = client.status().unwrap();
    assert!(
        node.ready && node.range.contains(&a.address.addr()),
        "{node:?}"
    );
    assert_eq!(client.release("typed").unwrap(), Some(a.address.addr()));
    for refused in [
        client.remove_peer("dead:beef:0000:0001").unwrap_err(),
        client.delete_veth("vethwf0").unwrap_err(),
    ] {
        match refused {
            ClientError::Api(e) => assert_eq!(e.kind, ErrorKind::Refused, "{e}"),
            other => panic!("{other:?}"),
        }
    }

    let status = weft_api::StatusClient::new(agent.status);
    assert_eq!(status.not_ready().unwrap(), None);
    let peers = status.peers().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].hops, Some(0));
    let ipam = status.ipam().unwrap();
    assert!(ipam.seeded && ipam.mode == "ring", "{ipam:?}");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"hello", agent.udp).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let page = status
            .connections::<weft_dataplane::status::DataplaneState>()
            .unwrap();
        assert_eq!(page.dataplane.requested, "none");
        if page.dropped.get(&DropReason::Malformed) == Some(&1) {
            break;
        }
        assert!(Instant::now() < deadline, "drop not shown: {page:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
