//! `weft router --kube` against a real kube-apiserver (ci/kube-test.sh):
//! three agents (`--datapath none`, loopback addresses 127.0.0.21-23) that
//! are given no `--peer` find each other through Node objects, seed the
//! ring, set their Node condition, and the space of a Node deleted after
//! its agent died is reclaimed by the others.
//!
//! Skipped (prints a note and passes) unless WEFT_KUBE_TESTS=1 and
//! KUBECONFIG_ADMIN / KUBECONFIG_WEFT name the server's kubeconfigs. The
//! agents run with the weft service account's token; deploy/weft.yaml's
//! RBAC must be applied (ci/kube-test.sh does).

use k8s_openapi::api::core::v1::Node;
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

fn start(name: &str, ip: &str, port: u16, dir: &Path, kubeconfig: &str) -> Agent {
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

async fn create_node(admin: &Client, name: &str, ip: &str) {
    let nodes: Api<Node> = Api::all(admin.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_find_each_other_through_nodes_and_reclaim_a_deleted_one() {
    let on = std::env::var("WEFT_KUBE_TESTS").is_ok_and(|v| v == "1");
    let (true, Ok(admin), Ok(weft)) = (
        on,
        std::env::var("KUBECONFIG_ADMIN"),
        std::env::var("KUBECONFIG_WEFT"),
    ) else {
        eprintln!("skipped: set WEFT_KUBE_TESTS=1, KUBECONFIG_ADMIN and KUBECONFIG_WEFT");
        return;
    };
    let admin = weft_kube::connect_kubeconfig(Path::new(&admin))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tag = std::process::id();
    let names: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("agent-{n}-{tag}"))
        .collect();
    let ips = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];
    for (name, ip) in names.iter().zip(ips) {
        create_node(&admin, name, ip).await;
    }
    let port = free_port();
    let mut agents: Vec<Agent> = names
        .iter()
        .zip(ips)
        .map(|(name, ip)| start(name, ip, port, dir.path(), &weft))
        .collect();

    // No --peer: only the Nodes tell them about each other, and the ring
    // (consensus=3) seeds only once all three are connected.
    for a in &agents {
        eventually("every agent ready", Duration::from_secs(60), || {
            get(&a.status, "/readyz").is_some_and(|(code, _)| code == 200)
        })
        .await;
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
