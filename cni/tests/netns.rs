//! weft-cni against a running agent, in real network namespaces (needs
//! root; skipped otherwise). Each test builds its own node namespace with
//! an agent, runs the plugin inside it as a runtime would, and removes
//! everything at the end.

use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn root() -> bool {
    if nix_uid() != 0 {
        eprintln!("skipped: needs root for network namespaces");
        return false;
    }
    true
}

fn nix_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(1)
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A node namespace with a weft agent, and pod namespaces; all removed on
/// drop.
struct Node {
    ns: String,
    dir: tempfile::TempDir,
    agent: Option<Child>,
    /// Agents of other (control-plane only) nodes sharing the namespace.
    peers: Vec<Child>,
    pods: Vec<String>,
}

impl Node {
    fn new() -> Node {
        let mut node = Node::without_agent();
        node.start_agent(&[
            "--listen",
            "127.0.0.1:6783",
            "--ipalloc-init",
            "consensus=1",
        ]);
        node.wait_until("the agent made a bridge", || {
            ip(&["-n", &node.ns, "link", "show", "weft"])
        });
        node
    }

    fn without_agent() -> Node {
        let ns = format!(
            "wct-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        assert!(ip(&["netns", "add", &ns]));
        assert!(ip(&["-n", &ns, "link", "set", "lo", "up"]));
        Node {
            ns,
            dir: tempfile::tempdir().unwrap(),
            agent: None,
            peers: Vec::new(),
            pods: Vec::new(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("weft.sock")
    }

    /// `weft ARGS` in the node namespace.
    fn weft(&self, args: &[&str]) -> Command {
        self.weft_in(&self.ns, args)
    }

    fn weft_in(&self, ns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(env!("CARGO_BIN_EXE_weft-cni").replace("weft-cni", "weft"))
            .args(args)
            .env_remove("WEFT_PASSWORD")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// This node's agent, programming the namespace's kernel.
    fn start_agent(&mut self, extra: &[&str]) {
        let child = self
            .weft(&["router", "--name", "node", "--mtu", "1400", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .arg("--socket")
            .arg(self.socket())
            .args(extra)
            .spawn()
            .expect("weft binary (cargo build -p weft)");
        self.agent = Some(child);
    }

    /// Polls `done` every 50 ms, for up to 20 s.
    fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_agent(&mut self) {
        for mut a in self.agent.take().into_iter().chain(self.peers.drain(..)) {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// A namespace removed with the node: a pod's, or another node's.
    fn pod(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.ns);
        assert!(ip(&["netns", "add", &ns]));
        self.pods.push(ns.clone());
        ns
    }

    fn config(&self, version: &str) -> Value {
        json!({"cniVersion": version, "name": "weft", "type": "weft-cni",
               "socket": self.socket()})
    }

    /// Runs the plugin in the node namespace: (exit ok, stdout as JSON).
    fn cni(&self, command: &str, container: &str, netns: &str, conf: &Value) -> (bool, Value) {
        self.cni_raw(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            conf.to_string().as_bytes(),
        )
    }

    fn cni_raw(&self, env: &[(&str, &str)], stdin: &[u8]) -> (bool, Value) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, env!("CARGO_BIN_EXE_weft-cni")])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
        };
        (out.status.success(), value)
    }

    fn status(&self) -> (bool, Value) {
        self.cni_raw(
            &[("CNI_COMMAND", "STATUS")],
            self.config("1.1.0").to_string().as_bytes(),
        )
    }

    fn allocations(&self) -> usize {
        let (ok, v) = self.status();
        assert!(ok, "{v}");
        let mut s = std::os::unix::net::UnixStream::connect(self.socket()).unwrap();
        writeln!(s, "{}", json!({"op": "list"})).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        v["allocations"].as_array().unwrap().len()
    }

    /// Veths on the node, once deletions the agent runs in the
    /// background settle (up to 5 s).
    fn veths_settled(&self, want: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.veths();
            if n == want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn veths(&self) -> usize {
        let out = Command::new("ip")
            .args(["-n", &self.ns, "-o", "link", "show", "type", "veth"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_agent();
        for p in &self.pods {
            ip(&["netns", "del", p]);
        }
        ip(&["netns", "del", &self.ns]);
    }
}

fn netns_path(ns: &str) -> String {
    format!("/var/run/netns/{ns}")
}

fn address_of(result: &Value) -> String {
    result["ips"][0]["address"].as_str().unwrap().to_string()
}

/// The shipped conflist offers 1.0.0 (containerd 1.6's libcni) and 1.1.0.
#[test]
fn add_check_del_round_trip_and_two_pods_talk_over_the_bridge() {
    if !root() {
        return;
    }
    for version in ["1.0.0", "1.1.0"] {
        round_trip(version);
    }
}

fn round_trip(version: &str) {
    let mut node = Node::new();
    let (a, b) = (node.pod("a"), node.pod("b"));
    let conf = node.config(version);
    let (ok, ra) = node.cni("ADD", "ca", &netns_path(&a), &conf);
    assert!(ok, "{ra}");
    assert_eq!(ra["cniVersion"], version);
    // The pod's bridge port is in hairpin mode (hairpinMode, on by
    // default): a frame may leave by the port it came in, as a pod's own
    // packets do when it reaches a Service whose only backend is itself
    // and the DNAT happens on the bridged path.
    let host_veth = ra["interfaces"][0]["name"].as_str().unwrap();
    let port = Command::new("ip")
        .args([
            "netns", "exec", &node.ns, "bridge", "-d", "link", "show", "dev", host_veth,
        ])
        .output()
        .unwrap();
    let port = String::from_utf8_lossy(&port.stdout);
    assert!(port.contains("hairpin on"), "{port}");
    assert_eq!(ra["interfaces"][1]["name"], "eth0");
    assert_eq!(ra["routes"][0]["dst"], "0.0.0.0/0");
    let (ok, rb) = node.cni("ADD", "cb", &netns_path(&b), &conf);
    assert!(ok, "{rb}");
    assert_ne!(address_of(&ra), address_of(&rb));
    // Two pods on one node reach each other through the bridge.
    let target = address_of(&rb);
    let target = target.split('/').next().unwrap();
    let ping = Command::new("ip")
        .args(["netns", "exec", &a, "ping", "-c1", "-W2", target])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    // CHECK against the prevResult passes; a wrong one fails.
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = ra.clone();
    let (ok, v) = node.cni("CHECK", "ca", &netns_path(&a), &with_prev);
    assert!(ok, "{v}");
    assert_eq!(v, Value::Null, "CHECK prints nothing on success");
    with_prev["prevResult"] = rb.clone();
    let (ok, v) = node.cni("CHECK", "ca", &netns_path(&a), &with_prev);
    assert!(!ok);
    assert!(v["code"].as_u64().is_some(), "{v}");
    assert_eq!(node.allocations(), 2);
    // STATUS and GC came with 1.1.0; under 1.0.0 they are refused (code 1)
    // in the version asked.
    for command in ["STATUS", "GC"] {
        let (ok, v) = node.cni_raw(&[("CNI_COMMAND", command)], conf.to_string().as_bytes());
        if version == "1.0.0" {
            assert!(!ok, "{command}: {v}");
            assert_eq!((&v["code"], &v["cniVersion"]), (&json!(1), &json!(version)));
        } else if command == "STATUS" {
            assert!(ok, "{command}: {v}");
        }
    }
    // DEL, DEL again, and DEL after the namespace is gone all succeed.
    let (ok, v) = node.cni("DEL", "ca", &netns_path(&a), &conf);
    assert!(ok, "{v}");
    let (ok, v) = node.cni("DEL", "ca", &netns_path(&a), &conf);
    assert!(ok, "{v}");
    ip(&["netns", "del", &b]);
    let (ok, v) = node.cni("DEL", "cb", &netns_path(&b), &conf);
    assert!(ok, "{v}");
    assert_eq!(node.allocations(), 0);
    assert_eq!(node.veths_settled(0), 0);
}

#[test]
fn results_follow_the_requested_version() {
    if !root() {
        return;
    }
    let mut node = Node::new();
    let p = node.pod("p");
    let (ok, r) = node.cni("ADD", "c1", &netns_path(&p), &node.config("0.3.1"));
    assert!(ok, "{r}");
    assert_eq!(r["cniVersion"], "0.3.1");
    assert_eq!(r["ips"][0]["version"], "4");
    let (ok, v) = node.cni_raw(&[("CNI_COMMAND", "VERSION")], b"{\"cniVersion\":\"1.1.0\"}");
    assert!(ok);
    assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
}

#[test]
fn bad_input_gets_its_error_code_and_a_failed_add_leaves_nothing() {
    if !root() {
        return;
    }
    let mut node = Node::new();
    let p = node.pod("p");
    let conf = node.config("1.0.0");
    let code = |r: (bool, Value)| {
        assert!(!r.0, "{}", r.1);
        r.1["code"].as_u64().unwrap()
    };
    // Bad JSON, unknown version, invalid config values.
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
    ];
    assert_eq!(code(node.cni_raw(&env, b"{oops")), 6);
    assert_eq!(code(node.cni_raw(&env, b"{\"cniVersion\":\"7.0.0\"}")), 1);
    assert_eq!(
        code(node.cni_raw(&env, b"{\"cniVersion\":\"1.0.0\",\"mtu\":3}")),
        7
    );
    // Missing and invalid variables.
    assert_eq!(
        code(node.cni_raw(&[("CNI_COMMAND", "ADD")], conf.to_string().as_bytes())),
        4
    );
    assert_eq!(code(node.cni("ADD", "bad id!", &netns_path(&p), &conf)), 4);
    // A namespace that does not exist: no address is taken.
    assert_eq!(code(node.cni("ADD", "c1", "/var/run/netns/nope", &conf)), 4);
    assert_eq!(node.allocations(), 0);
    assert_eq!(node.veths(), 0);
    // The agent down: try again later, with a message saying so.
    node.stop_agent();
    let (ok, v) = node.cni("ADD", "c2", &netns_path(&p), &conf);
    assert!(!ok);
    assert_eq!(v["code"], 11, "{v}");
    assert!(
        v["msg"]
            .as_str()
            .unwrap()
            .contains("weft agent not reachable"),
        "{v}"
    );
    assert_eq!(code(node.status()), 50);
    assert_eq!(node.veths(), 0);
}

#[test]
fn gc_releases_attachments_the_runtime_no_longer_has() {
    if !root() {
        return;
    }
    let mut node = Node::new();
    let (a, b) = (node.pod("a"), node.pod("b"));
    let conf = node.config("1.1.0");
    assert!(node.cni("ADD", "keep", &netns_path(&a), &conf).0);
    assert!(node.cni("ADD", "stale", &netns_path(&b), &conf).0);
    // Without the list, GC is an invalid configuration and keeps every pod.
    let (ok, v) = node.cni_raw(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes());
    assert_eq!((ok, &v["code"]), (false, &json!(7)), "{v}");
    assert_eq!(node.allocations(), 2);
    assert_eq!(node.veths(), 2);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let (ok, v) = node.cni_raw(&[("CNI_COMMAND", "GC")], gc.to_string().as_bytes());
    assert!(ok, "{v}");
    assert_eq!(node.allocations(), 1);
    assert_eq!(node.veths_settled(1), 1);
}

/// A runtime calls ADD as soon as the conflist is on the node, while the
/// node still waits for a quorum to seed the ring: ADD waits for the
/// node's space and bridge instead of failing, and STATUS answers 50 until
/// then.
#[test]
fn an_add_before_the_node_has_space_waits_for_it() {
    if !root() {
        return;
    }
    let mut node = Node::without_agent();
    let p = node.pod("p");
    // The quorum's other node, in a namespace of its own on a veth: the
    // agent routes that node's pod prefixes via its underlay address.
    let other = node.pod("other");
    assert!(ip(&[
        "-n", &node.ns, "link", "add", "underlay", "type", "veth", "peer", "name", "underlay",
        "netns", &other
    ]));
    for (ns, address) in [(&node.ns, "192.168.250.1/30"), (&other, "192.168.250.2/30")] {
        assert!(ip(&["-n", ns, "addr", "add", address, "dev", "underlay"]));
        assert!(ip(&["-n", ns, "link", "set", "underlay", "up"]));
        assert!(ip(&["-n", ns, "link", "set", "lo", "up"]));
    }
    node.start_agent(&[
        "--listen",
        "192.168.250.1:6783",
        "--ipalloc-init",
        "consensus=2",
        "--peer",
        "192.168.250.2",
    ]);
    node.wait_until("the agent's socket appears", || {
        std::os::unix::net::UnixStream::connect(node.socket()).is_ok()
    });
    let (ok, v) = node.status();
    assert!(!ok);
    assert_eq!(v["code"], 50, "{v}");
    let add = std::thread::scope(|s| {
        let add = s.spawn(|| node.cni("ADD", "c1", &netns_path(&p), &node.config("1.1.0")));
        // Once the agent holds the request, the second node of the quorum.
        node.wait_until("the allocation is pending", || {
            let out = node
                .weft(&["status", "ipam"])
                .stdout(Stdio::piped())
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("c1/eth0")
        });
        let dir = node.dir.path().join("other");
        let peer = node
            .weft_in(&other, &["router", "--name", "other", "--datapath", "none"])
            .args(["--listen", "192.168.250.2:6783"])
            .args(["--ipalloc-init", "consensus=2", "--peer", "192.168.250.1"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--socket")
            .arg(dir.join("weft.sock"))
            .spawn()
            .unwrap();
        (add.join(), peer)
    });
    node.peers.push(add.1);
    let (ok, r) = add.0.unwrap();
    assert!(ok, "{r}");
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    let (ok, v) = node.status();
    assert!(ok, "{v}");
}
