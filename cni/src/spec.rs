//! The CNI 1.1 contract: the environment and network configuration a
//! runtime hands the plugin, the result and error objects it prints, and
//! version negotiation down to 0.3.0.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::PathBuf;

pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The spec's well-known error codes.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// weft's own: the agent refused the request (range exhausted, ...).
    pub const REFUSED: u32 = 100;
    /// weft's own: the kernel refused a change.
    pub const NETLINK: u32 = 101;
}

/// A CNI error object; printed on stdout, exit status 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = self.details.clone().into();
        }
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

/// The CNI_* variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
}

impl Env {
    /// Reads the variables the command needs, with a clear error for each
    /// missing or invalid one.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_COMMAND={other:?} is not a CNI command (ADD, DEL, CHECK, STATUS, GC or VERSION)"
                    ),
                ));
            }
            None => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
        };
        let per_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let required = |name: &str| -> Result<String, CniError> {
            match get(name) {
                Some(v) if !v.is_empty() => Ok(v),
                _ if !per_attachment => Ok(String::new()),
                _ => Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{name} is not set"),
                )),
            }
        };
        let container_id = required("CNI_CONTAINERID")?;
        if per_attachment && !valid_container_id(&container_id) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_CONTAINERID={container_id:?} is invalid: it must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
                ),
            ));
        }
        let ifname = required("CNI_IFNAME")?;
        if per_attachment && !valid_ifname(&ifname) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_IFNAME={ifname:?} is not a valid interface name (1 to 15 characters, no '/', ':' or whitespace)"
                ),
            ));
        }
        let netns = get("CNI_NETNS")
            .filter(|n| !n.is_empty())
            .map(PathBuf::from);
        if command == Command::Add && netns.is_none() {
            return Err(CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"));
        }
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
        })
    }

    /// The agent's key for this attachment.
    pub fn attachment(&self) -> String {
        attachment(&self.container_id, &self.ifname)
    }
}

pub fn attachment(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

fn valid_container_id(id: &str) -> bool {
    id.len() <= 200
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// One attachment the runtime still has (GC keeps these).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
struct ValidAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The largest network configuration read from stdin; a runtime's are a
/// few KiB (GC's list of attachments grows by ~60 bytes a pod).
pub const MAX_CONFIG: u64 = 1 << 20;

/// Reads the configuration, at most [`MAX_CONFIG`] bytes of it: endless
/// input (`< /dev/zero`) is an error, not a read until memory runs out.
pub fn read_config(stdin: impl std::io::Read) -> Result<Vec<u8>, CniError> {
    let mut bytes = Vec::new();
    stdin
        .take(MAX_CONFIG + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| {
            CniError::new(
                code::IO,
                format!("cannot read the network configuration: {e}"),
            )
        })?;
    if bytes.len() as u64 > MAX_CONFIG {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "the network configuration on stdin is larger than {} MiB",
                MAX_CONFIG >> 20
            ),
        ));
    }
    Ok(bytes)
}

/// weft's network configuration (stdin).
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// The agent's local API socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// Pod MTU; the agent's (underlay minus overhead) when absent.
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(rename = "hairpinMode", default = "yes")]
    pub hairpin_mode: bool,
    #[serde(rename = "logFile", default)]
    pub log_file: Option<PathBuf>,
    #[serde(rename = "logLevel", default)]
    pub log_level: Option<String>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    /// GC's list, checked by [`NetConf::valid_attachments`]: kept raw so
    /// that a malformed list is an invalid configuration, not undecodable.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Value>,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/weft/weft.sock")
}
fn default_bridge() -> String {
    "weft".into()
}
fn yes() -> bool {
    true
}

impl NetConf {
    /// Decodes stdin; checks the version and values.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                format!("cannot decode the network configuration: {e}"),
            )
        })?;
        if !SUPPORTED.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {:?} is not supported; weft-cni supports {}",
                    conf.cni_version,
                    SUPPORTED.join(", ")
                ),
            ));
        }
        if let Some(mtu) = conf.mtu
            && !(576..=65_535).contains(&mtu)
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("mtu {mtu} is out of range (576 to 65535)"),
            ));
        }
        if !valid_ifname(&conf.bridge) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("bridge {:?} is not a valid interface name", conf.bridge),
            ));
        }
        Ok(conf)
    }

    /// The attachments GC keeps, as the agent's keys. The key is required:
    /// read as "none valid", its absence would release every pod's address.
    pub fn valid_attachments(&self) -> Result<BTreeSet<String>, CniError> {
        let invalid = |why: String| {
            CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "GC needs cni.dev/valid-attachments, a list of {{\"containerID\", \"ifname\"}}: {why}"
                ),
            )
        };
        let list = self
            .valid_attachments
            .clone()
            .ok_or_else(|| invalid("the key is missing".into()))?;
        let list: Vec<ValidAttachment> =
            serde_json::from_value(list).map_err(|e| invalid(e.to_string()))?;
        Ok(list
            .iter()
            .map(|a| attachment(&a.container_id, &a.ifname))
            .collect())
    }

    /// Whether this configuration's version knows `command`.
    pub fn allows(&self, command: Command) -> Result<(), CniError> {
        let major_minor = |v: &str| -> (u32, u32) {
            let mut p = v.split('.').map(|x| x.parse().unwrap_or(0));
            (p.next().unwrap_or(0), p.next().unwrap_or(0))
        };
        let v = major_minor(&self.cni_version);
        let needs = match command {
            Command::Check => (0, 4),
            Command::Status | Command::Gc => (1, 1),
            _ => (0, 0),
        };
        if v < needs {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "{command:?} needs cniVersion {}.{}.0 or later; the configuration says {}",
                    needs.0, needs.1, self.cni_version
                ),
            ));
        }
        Ok(())
    }
}

/// What ADD made, in the spec's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub host_ifname: String,
    pub host_mac: String,
    pub ifname: String,
    pub mac: String,
    pub sandbox: String,
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
}

impl Attached {
    /// The result object for `version`: 1.x shape, or 0.3/0.4 with each
    /// IP's `version` field.
    pub fn result(&self, version: &str) -> Value {
        let legacy = version.starts_with("0.");
        let mut ip = json!({
            "address": self.address.to_string(),
            "gateway": self.gateway.to_string(),
            "interface": 1,
        });
        if legacy {
            ip["version"] = "4".into();
        }
        json!({
            "cniVersion": version,
            "interfaces": [
                {"name": self.host_ifname, "mac": self.host_mac},
                {"name": self.ifname, "mac": self.mac, "sandbox": self.sandbox},
            ],
            "ips": [ip],
            "routes": [{"dst": "0.0.0.0/0", "gw": self.gateway.to_string()}],
            "dns": {},
        })
    }
}

/// The address and gateway a prevResult says the interface has.
pub fn prev_address(prev: &Value, ifname: &str) -> Option<(Ipv4Net, Option<Ipv4Addr>)> {
    let interfaces = prev["interfaces"].as_array()?;
    let index = interfaces
        .iter()
        .position(|i| i["name"] == ifname && i["sandbox"].is_string());
    prev["ips"].as_array()?.iter().find_map(|ip| {
        let on_ours = match (ip["interface"].as_u64(), index) {
            (Some(i), Some(ours)) => i as usize == ours,
            _ => true,
        };
        if !on_ours {
            return None;
        }
        let address: Ipv4Net = ip["address"].as_str()?.parse().ok()?;
        let gateway = ip["gateway"].as_str().and_then(|g| g.parse().ok());
        Some((address, gateway))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::parse(|k| map.get(k).cloned())
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let e = env(&[]).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "CNI_COMMAND is not set"));
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]).unwrap_err();
        assert!(e.msg.contains("CNI_CONTAINERID"), "{e}");
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"), "{e}");
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "../x"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert_eq!(e.code, 4);
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "a/b"),
        ])
        .unwrap_err();
        assert!(e.msg.contains("CNI_IFNAME"), "{e}");
        let e = env(&[("CNI_COMMAND", "FLY")]).unwrap_err();
        assert_eq!(e.code, 4);
        // VERSION and STATUS need nothing else.
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        assert!(env(&[("CNI_COMMAND", "STATUS")]).is_ok());
    }

    #[test]
    fn configuration_errors_have_their_codes() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, 6);
        assert_eq!(NetConf::parse(b"[]").unwrap_err().code, 6);
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","type":"weft-cni"}"#).unwrap_err();
        assert_eq!(e.code, 1, "{e}");
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","mtu":10}"#).unwrap_err();
        assert_eq!(e.code, 7);
        let c = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"weft"}"#).unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/weft/weft.sock"));
        assert!(c.hairpin_mode);
        assert_eq!(c.allows(Command::Check).unwrap_err().code, 1);
        assert_eq!(c.allows(Command::Gc).unwrap_err().code, 1);
        assert!(c.allows(Command::Add).is_ok());
    }

    #[test]
    fn gc_needs_a_well_formed_list_of_valid_attachments() {
        let conf = |extra: &str| {
            NetConf::parse(format!(r#"{{"cniVersion":"1.1.0","name":"weft"{extra}}}"#).as_bytes())
                .unwrap()
        };
        for malformed in [
            "",
            r#","cni.dev/valid-attachments":null"#,
            r#","cni.dev/valid-attachments":{}"#,
            r#","cni.dev/valid-attachments":["c1"]"#,
            r#","cni.dev/valid-attachments":[{"containerID":"c1"}]"#,
        ] {
            let e = conf(malformed).valid_attachments().unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{malformed}: {e}");
            assert!(e.msg.contains("cni.dev/valid-attachments"), "{e}");
        }
        let none = conf(r#","cni.dev/valid-attachments":[]"#);
        assert_eq!(none.valid_attachments().unwrap(), BTreeSet::new());
        let one = conf(r#","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]"#);
        assert_eq!(
            one.valid_attachments().unwrap(),
            BTreeSet::from(["c1/eth0".to_string()])
        );
    }

    #[test]
    fn results_take_the_requested_version_shape() {
        let a = Attached {
            host_ifname: "vethwf1".into(),
            host_mac: "02:00:00:00:00:01".into(),
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:02".into(),
            sandbox: "/var/run/netns/x".into(),
            address: "10.32.0.5/12".parse().unwrap(),
            gateway: "10.32.0.1".parse().unwrap(),
        };
        let new = a.result("1.1.0");
        assert_eq!(new["cniVersion"], "1.1.0");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["ips"][0]["interface"], 1);
        let old = a.result("0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(
            prev_address(&new, "eth0"),
            Some((a.address, Some(a.gateway)))
        );
    }
}
