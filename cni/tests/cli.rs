//! weft-cni's handling of bad input, against a stand-in agent that records
//! what it is asked (no root, no namespaces): bad input must be refused
//! before the plugin asks the agent to change anything.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// Answers every request as a ready agent holding one pod would (or, when
/// `pending`, one still waiting for address space), and records each
/// request's `op`.
struct FakeAgent {
    socket: PathBuf,
    ops: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl FakeAgent {
    fn start() -> FakeAgent {
        FakeAgent::answering(false)
    }

    fn answering(pending: bool) -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("weft.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let ops = Arc::new(Mutex::new(Vec::new()));
        let seen = ops.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut write = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let request: Value = serde_json::from_str(&line).unwrap_or_default();
                    let op = request["op"].as_str().unwrap_or("?").to_string();
                    let answer = answer(&op, &request, pending);
                    seen.lock().unwrap().push(op);
                    if writeln!(write, "{answer}").is_err() {
                        break;
                    }
                }
            }
        });
        FakeAgent {
            socket,
            ops,
            _dir: dir,
        }
    }

    fn ops(&self) -> Vec<String> {
        self.ops.lock().unwrap().clone()
    }

    fn config(&self) -> Value {
        json!({"cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
               "socket": self.socket})
    }
}

fn answer(op: &str, request: &Value, pending: bool) -> Value {
    let pod = json!({"container_id": "c1/eth0", "address": "10.32.0.2/12",
                     "gateway": "10.32.0.1"});
    match op {
        "allocate" if pending => json!({"ok": false, "error": {"kind": "pending",
            "message": "no address for c1/eth0 yet: the ring is not seeded"}}),
        "status" => json!({"ok": true, "ready": true, "reason": null, "bridge": "weft",
                           "mtu": 1400, "range": "10.32.0.0/12", "gateway": "10.32.0.1"}),
        "list" => json!({"ok": true, "allocations": [pod]}),
        "allocate" => {
            let mut a = pod;
            a["ok"] = true.into();
            a["container_id"] = request["container_id"].clone();
            a
        }
        "release" => json!({"ok": true, "released": "10.32.0.2"}),
        _ => json!({"ok": true}),
    }
}

/// Runs the plugin: (exit ok, the JSON it printed, if any).
fn cni(env: &[(&str, &str)], stdin: Vec<u8>) -> (bool, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // The plugin may stop reading early; a broken pipe is expected then.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let value = match text.trim() {
        "" => Value::Null,
        text => serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}")),
    };
    (out.status.success(), value)
}

fn error_code(outcome: (bool, Value)) -> (u64, String) {
    assert!(!outcome.0, "{}", outcome.1);
    (
        outcome.1["code"].as_u64().unwrap(),
        outcome.1["msg"].as_str().unwrap().to_string(),
    )
}

#[test]
fn gc_without_a_valid_list_of_attachments_is_invalid_and_releases_nothing() {
    let agent = FakeAgent::start();
    for list in [
        None,
        Some(json!("all")),
        Some(json!([{"containerID": "c1"}])),
    ] {
        let mut conf = agent.config();
        if let Some(list) = list {
            conf["cni.dev/valid-attachments"] = list;
        }
        let outcome = cni(&[("CNI_COMMAND", "GC")], conf.to_string().into_bytes());
        let (code, msg) = error_code(outcome);
        assert_eq!(code, 7, "{conf}: {msg}");
        assert!(msg.contains("cni.dev/valid-attachments"), "{msg}");
    }
    assert_eq!(agent.ops(), Vec::<String>::new());
    // Present and empty: nothing is valid, the pod is released.
    let mut conf = agent.config();
    conf["cni.dev/valid-attachments"] = json!([]);
    let (ok, v) = cni(&[("CNI_COMMAND", "GC")], conf.to_string().into_bytes());
    assert!(ok, "{v}");
    assert_eq!(agent.ops(), ["list", "release"]);
}

#[test]
fn a_configuration_over_1_mib_is_refused_without_reading_it_all() {
    let agent = FakeAgent::start();
    let (code, msg) = error_code(cni(&[("CNI_COMMAND", "STATUS")], vec![0; 8 << 20]));
    assert_eq!(code, 7, "{msg}");
    assert!(msg.contains("larger than 1 MiB"), "{msg}");
    // Valid JSON, padded past the bound, is refused the same way.
    let mut conf = agent.config();
    conf["padding"] = " ".repeat(1 << 20).into();
    let (code, msg) = error_code(cni(
        &[("CNI_COMMAND", "STATUS")],
        conf.to_string().into_bytes(),
    ));
    assert_eq!(code, 7, "{msg}");
    assert_eq!(agent.ops(), Vec::<String>::new());
}

fn add(netns: &Path, conf: &Value) -> (bool, Value) {
    cni(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns.to_str().unwrap()),
        ],
        conf.to_string().into_bytes(),
    )
}

#[test]
fn a_netns_that_is_not_a_network_namespace_is_refused_before_allocating() {
    let agent = FakeAgent::start();
    let file = tempfile::NamedTempFile::new().unwrap();
    for netns in [file.path(), Path::new("/proc/self/ns/pid"), Path::new("/")] {
        let (code, msg) = error_code(add(netns, &agent.config()));
        assert_eq!(code, 4, "{}: {msg}", netns.display());
        assert!(msg.contains("CNI_NETNS"), "{msg}");
    }
    assert_eq!(agent.ops(), Vec::<String>::new());
}

#[test]
fn an_add_that_outwaits_the_agent_says_try_again_and_keeps_no_request() {
    // Getting as far as allocating takes a namespace the plugin may enter.
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) != 0 {
        eprintln!("skipped: needs root to enter a network namespace");
        return;
    }
    let agent = FakeAgent::answering(true);
    let (code, msg) = error_code(add(Path::new("/proc/self/ns/net"), &agent.config()));
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains("not seeded"), "{msg}");
    assert_eq!(agent.ops(), ["status", "allocate", "release"]);
}
