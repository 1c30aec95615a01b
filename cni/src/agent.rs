//! The weft agent's local API (its Unix socket), as the plugin uses it.

use crate::spec::{CniError, code};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long ADD waits for an address before telling the runtime to retry.
const ALLOCATE_WAIT_MS: u64 = 20_000;

pub struct Agent<'a> {
    pub socket: &'a Path,
}

impl Agent<'_> {
    fn call(&self, request: Value, timeout: Duration) -> Result<Value, CniError> {
        let unreachable = |e: std::io::Error| {
            CniError::new(
                code::TRY_AGAIN,
                format!(
                    "weft agent not reachable at {}: is the weft DaemonSet running on this node?",
                    self.socket.display()
                ),
            )
            .with_details(e.to_string())
        };
        let mut stream = UnixStream::connect(self.socket).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(unreachable)?;
        stream
            .write_all(format!("{request}\n").as_bytes())
            .map_err(unreachable)?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .map_err(unreachable)?;
        let answer: Value = serde_json::from_str(&line).map_err(|e| {
            CniError::new(code::IO, format!("the weft agent answered nonsense: {e}"))
        })?;
        if answer["ok"] == true {
            return Ok(answer);
        }
        let message = answer["error"]["message"]
            .as_str()
            .unwrap_or("unknown error")
            .to_string();
        let code = match answer["error"]["kind"].as_str() {
            Some("pending") | Some("unavailable") => code::TRY_AGAIN,
            Some("bad_request") => code::IO,
            _ => code::REFUSED,
        };
        Err(CniError::new(code, message))
    }

    pub fn allocate(&self, attachment: &str) -> Result<Value, CniError> {
        self.call(
            json!({"op": "allocate", "container_id": attachment, "wait_ms": ALLOCATE_WAIT_MS}),
            Duration::from_millis(ALLOCATE_WAIT_MS + 5_000),
        )
    }

    pub fn release(&self, attachment: &str) -> Result<(), CniError> {
        self.call(
            json!({"op": "release", "container_id": attachment}),
            Duration::from_secs(10),
        )
        .map(|_| ())
    }

    pub fn check(&self, attachment: &str) -> Result<Value, CniError> {
        self.call(
            json!({"op": "check", "container_id": attachment}),
            Duration::from_secs(10),
        )
    }

    pub fn list(&self) -> Result<Vec<String>, CniError> {
        let answer = self.call(json!({"op": "list"}), Duration::from_secs(10))?;
        Ok(answer["allocations"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["container_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Asks the agent to delete a pod's host veth in the background.
    pub fn delete_veth(&self, interface: &str) -> Result<(), CniError> {
        self.call(
            json!({"op": "delete_veth", "interface": interface}),
            Duration::from_secs(5),
        )
        .map(|_| ())
    }

    pub fn status(&self) -> Result<Value, CniError> {
        self.call(json!({"op": "status"}), Duration::from_secs(10))
    }
}
