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
    let status: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let socket = dir.join("weft.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_weft"))
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
        let agent = spawn(data, &[]);
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
        let Ok(mut s) = TcpStream::connect(self.status) else {
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
