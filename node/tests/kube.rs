//! `weft router --kube` against a real kube-apiserver (ci/kube-test.sh):
//! three agents (`--datapath none`, loopback addresses 127.0.0.21-23) that
//! are given no `--peer` find each other through Node objects, seed the
//! ring, set their Node condition, and the space of a Node deleted after
//! its agent died is reclaimed by the others.
//!
//! A second test runs two agents in node-cidr mode (podCIDRs from the
//! Nodes) through an API server stop and start.
//!
//! Skipped (prints a note and passes) unless WEFT_KUBE_TESTS=1 and
//! KUBECONFIG_ADMIN / KUBECONFIG_WEFT name the server's kubeconfigs. The
//! agents run with the weft service account's token; deploy/weft.yaml's
//! RBAC must be applied (ci/kube-test.sh does).

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent {
    child: Child,
    status: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

fn start(name: &str, ip: &str, port: u16, dir: &Path, kubeconfig: &str, extra: &[&str]) -> Agent {
    let data = dir.join(name);
    let status = format!("{ip}:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "router",
            "--kube",
            "--datapath",
            "none",
            "--ipalloc-init",
            "consensus=3",
        ])
        .args(extra)
        .args(["--name", name, "--node-name", name])
        .args([
            "--listen",
            &format!("{ip}:{port}"),
            "--status-addr",
            &status,
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--socket")
        .arg(data.join("weft.sock"))
        .env("KUBECONFIG", kubeconfig)
        .env_remove("WEFT_PASSWORD")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Agent { child, status }
}

fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

async fn eventually(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn create_node(admin: &Client, name: &str, ip: &str, pod_cidr: Option<&str>) {
    let nodes: Api<Node> = Api::all(admin.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidr.map(Into::into),
            ..Default::default()
        }),
        ..Default::default()
    };
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let status = serde_json::json!({
        "status": { "addresses": [{ "type": "InternalIP", "address": ip }] }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

async fn condition(admin: &Client, name: &str) -> Option<(String, String)> {
    let node = Api::<Node>::all(admin.clone()).get(name).await.ok()?;
    let c = node
        .status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "NetworkUnavailable")?;
    Some((c.status, c.reason.unwrap_or_default()))
}

/// Space the agent at `status` sees `nickname` own.
fn owned_by(status: &str, nickname: &str) -> Option<u64> {
    let (_, body) = get(status, "/status/ipam")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let peers = v["peers"].as_array()?;
    Some(
        peers
            .iter()
            .filter(|p| p["nickname"] == nickname)
            .map(|p| p["owned"].as_u64().unwrap_or(0))
            .sum(),
    )
}

/// The API server's clients, or `None` (test skipped).
struct Server {
    admin: Client,
    /// The admin kubeconfig's path (for `weft doctor --cluster`).
    admin_path: String,
    /// The weft service account's kubeconfig, for the agents.
    weft: String,
    /// Where ci/kube-apiserver.sh keeps the server (stop/start).
    dir: std::path::PathBuf,
}

async fn server() -> Option<Server> {
    let on = std::env::var("WEFT_KUBE_TESTS").is_ok_and(|v| v == "1");
    let (true, Ok(admin), Ok(weft)) = (
        on,
        std::env::var("KUBECONFIG_ADMIN"),
        std::env::var("KUBECONFIG_WEFT"),
    ) else {
        eprintln!("skipped: set WEFT_KUBE_TESTS=1, KUBECONFIG_ADMIN and KUBECONFIG_WEFT");
        return None;
    };
    let dir = Path::new(&admin).parent()?.to_path_buf();
    let admin_path = admin.clone();
    let admin = weft_kube::connect_kubeconfig(Path::new(&admin))
        .await
        .unwrap();
    Some(Server {
        admin,
        admin_path,
        weft,
        dir,
    })
}

fn ready(agent: &Agent) -> bool {
    get(&agent.status, "/readyz").is_some_and(|(code, _)| code == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_find_each_other_through_nodes_and_reclaim_a_deleted_one() {
    let Some(Server {
        admin,
        admin_path,
        weft,
        ..
    }) = server().await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tag = std::process::id();
    let names: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("agent-{n}-{tag}"))
        .collect();
    let ips = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];
    for (name, ip) in names.iter().zip(ips) {
        create_node(&admin, name, ip, None).await;
    }
    let port = free_port();
    let mut agents: Vec<Agent> = names
        .iter()
        .zip(ips)
        .map(|(name, ip)| start(name, ip, port, dir.path(), &weft, &[]))
        .collect();

    // No --peer: only the Nodes tell them about each other, and the ring
    // (consensus=3) seeds only once all three are connected.
    for a in &agents {
        eventually("every agent ready", Duration::from_secs(60), || ready(a)).await;
    }
    for name in &names {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = condition(&admin, name).await;
            if c == Some(("False".into(), "WeftIsUp".into())) {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: condition is {c:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // `weft doctor --cluster` on the first node: a line per Node with its
    // condition and peer; no weft pods (no kubelet here) is a failure.
    let lines = doctor_cluster(&agents[0], &dir.path().join(&names[0]), &admin_path);
    for (i, name) in names.iter().enumerate() {
        let line = &lines[&format!("node {name}")];
        let peer = if i == 0 {
            "this node"
        } else {
            "peer connected"
        };
        assert!(
            line.contains("no weft pod")
                && line.contains(peer)
                && line.contains("NetworkUnavailable=False (WeftIsUp)"),
            "{name}: {line}"
        );
    }

    // The third node's agent dies and its Node is deleted: the others
    // take over its space (once its links are dead and the Lease is won).
    let c_owned = owned_by(&agents[0].status, &names[2]).unwrap_or(0);
    assert!(c_owned > 0, "{} owns space before it leaves", names[2]);
    drop(agents.pop());
    Api::<Node>::all(admin.clone())
        .delete(&names[2], &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the deleted Node's space reclaimed",
        Duration::from_secs(90),
        || {
            owned_by(&agents[0].status, &names[2]) == Some(0)
                && owned_by(&agents[1].status, &names[2]) == Some(0)
        },
    )
    .await;

    drop(agents);
    for name in &names[..2] {
        let _ = Api::<Node>::all(admin.clone())
            .delete(name, &DeleteParams::default())
            .await;
    }
}

/// The prefixes the agent at `status` sees `nickname` hold.
fn prefixes_of(status: &str, nickname: &str) -> Vec<String> {
    let Some((_, body)) = get(status, "/status/ipam") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    peers
        .iter()
        .filter(|p| p["nickname"] == nickname)
        .flat_map(|p| p["prefixes"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_str().map(String::from))
        .collect()
}

/// Addresses the agent at `status` is told to connect to.
fn targets(status: &str) -> Vec<String> {
    let Some((_, body)) = get(status, "/status/connections") else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let targets = v["targets"].as_array().cloned().unwrap_or_default();
    targets
        .iter()
        .filter_map(|t| t["address"].as_str().map(String::from))
        .collect()
}

/// `weft doctor --cluster --json` against the agent at `agent`: each
/// check's name to its evidence.
fn doctor_cluster(
    agent: &Agent,
    data: &Path,
    kubeconfig: &str,
) -> std::collections::BTreeMap<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "doctor",
            "--cluster",
            "--json",
            "--status-addr",
            &agent.status,
        ])
        .arg("--socket")
        .arg(data.join("weft.sock"))
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no weft pods: failures");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let text = format!("{} {}", c["level"], c["evidence"]);
            (c["check"].as_str().unwrap().to_string(), text)
        })
        .collect()
}

fn kube_script(dir: &Path, verb: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/kube-apiserver.sh");
    let status = Command::new("bash")
        .arg(script)
        .arg(verb)
        .arg(dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "ci/kube-apiserver.sh {verb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_cidr_agents_take_their_pod_cidrs_and_outlive_an_api_server_restart() {
    let Some(Server {
        admin,
        weft,
        dir: kube_dir,
        ..
    }) = server().await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tag = std::process::id();
    let names = [format!("cidr-a-{tag}"), format!("cidr-b-{tag}")];
    let ips = ["127.0.0.24", "127.0.0.25"];
    let cidrs = ["10.32.7.0/24", "10.32.8.0/24"];
    for ((name, ip), cidr) in names.iter().zip(ips).zip(cidrs) {
        create_node(&admin, name, ip, Some(cidr)).await;
    }
    let port = free_port();
    let node_cidr = ["--ipam", "node-cidr"];
    let agents: Vec<Agent> = names
        .iter()
        .zip(ips)
        .map(|(name, ip)| start(name, ip, port, dir.path(), &weft, &node_cidr))
        .collect();
    for a in &agents {
        eventually("every agent ready", Duration::from_secs(60), || ready(a)).await;
    }
    // Each owns exactly its Node's podCIDR, and the other knows it.
    for (name, cidr) in names.iter().zip(cidrs) {
        for a in &agents {
            eventually("podCIDRs gossiped", Duration::from_secs(30), || {
                prefixes_of(&a.status, name) == [cidr]
            })
            .await;
        }
    }

    // The API server goes away: gossip and readiness carry on.
    let kube_dir = kube_dir.clone();
    tokio::task::spawn_blocking({
        let d = kube_dir.clone();
        move || kube_script(&d, "stop-apiserver")
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for a in &agents {
        assert!(ready(a), "agent ready while the API server is down");
        assert_eq!(prefixes_of(&a.status, &names[0]), [cidrs[0]]);
    }
    tokio::task::spawn_blocking(move || kube_script(&kube_dir, "start-apiserver"))
        .await
        .unwrap();

    // Back: the agents' watches resume, and a new Node becomes a peer.
    let late = format!("cidr-c-{tag}");
    create_node(&admin, &late, "127.0.0.26", Some("10.32.9.0/24")).await;
    let wanted = format!("127.0.0.26:{port}");
    for a in &agents {
        eventually(
            "a Node created after the restart",
            Duration::from_secs(60),
            || targets(&a.status).contains(&wanted),
        )
        .await;
    }

    drop(agents);
    for name in names.iter().chain([&late]) {
        let _ = Api::<Node>::all(admin.clone())
            .delete(name, &DeleteParams::default())
            .await;
    }
}
