//! The local API on the agent's Unix socket (owner only): one JSON request
//! per line, one JSON reply per line.
//!
//! ```text
//! {"op":"allocate","container_id":"abc","wait_ms":10000}
//! {"op":"release","container_id":"abc"}
//! {"op":"check","container_id":"abc"}
//! {"op":"list"}
//! {"op":"status"}
//! {"op":"remove_peer","peer":"node2"}
//! {"op":"delete_veth","interface":"vethwf1a2b3c4d"}
//! ```
//! Replies are `{"ok":true,...}` (the answer's fields beside `ok`) or
//! `{"ok":false,"error":{"kind":..,"message":..}}` where `kind` is
//! `bad_request`, `pending` (try again later), `refused` (the request
//! cannot succeed as asked) or `unavailable` (the agent is stopping, or
//! cannot save its state right now: try again). Requests for one container
//! ID are idempotent.

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::Ipv4Addr;

/// One request line. Unknown ops and unknown fields are refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// An address for a container, waiting up to `wait_ms` for space.
    Allocate {
        container_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_ms: Option<u64>,
    },
    Release {
        container_id: String,
    },
    Check {
        container_id: String,
    },
    /// Every pod's allocation on this node. (Variants without fields are
    /// written `{}` so that unknown fields are refused for them too.)
    List {},
    Status {},
    /// Reclaims the space of a peer removed for good (`weft rmpeer`):
    /// by peer name or nickname.
    RemovePeer {
        peer: String,
    },
    /// Deletes a pod's host-side veth (`vethwf…`) in the background, so
    /// CNI DEL need not wait for the kernel.
    DeleteVeth {
        interface: String,
    },
}

impl Request {
    /// The container a request names.
    pub fn container_id(&self) -> Option<&str> {
        match self {
            Request::Allocate { container_id, .. }
            | Request::Release { container_id }
            | Request::Check { container_id } => Some(container_id),
            _ => None,
        }
    }

    /// Whether answering changes the node's state, so the agent must be
    /// able to save it.
    pub fn saves(&self) -> bool {
        matches!(
            self,
            Request::Allocate { .. } | Request::Release { .. } | Request::RemovePeer { .. }
        )
    }

    /// Its `op`, for messages.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Allocate { .. } => "allocate",
            Request::Release { .. } => "release",
            Request::Check { .. } => "check",
            Request::List {} => "list",
            Request::Status {} => "status",
            Request::RemovePeer { .. } => "remove_peer",
            Request::DeleteVeth { .. } => "delete_veth",
        }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    Pending,
    Refused,
    Unavailable,
    /// A kind this build does not know (from a newer agent); never sent.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// An address and what a pod needs around it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct Attachment {
    pub container_id: String,
    /// The pod address with the allocation range's prefix length.
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
}

/// Whether the node can wire pods now, and how.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct NodeStatus {
    /// The agent can give addresses now.
    pub ready: bool,
    /// Why not, when not ready.
    pub reason: Option<String>,
    pub bridge: String,
    pub mtu: u32,
    pub range: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
}

/// What a request gets when it succeeds. On the wire each is a bare
/// object; read back, the variants are tried in order, so each one's
/// required fields tell it apart and `Accepted` (no fields) comes last.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
#[serde(untagged)]
pub enum Answer {
    /// To `allocate` and `check`.
    Attachment(Attachment),
    /// To `list`.
    List { allocations: Vec<Attachment> },
    /// To `status`.
    Status(NodeStatus),
    /// To `remove_peer`: how many addresses came back.
    Reclaimed { reclaimed: u64 },
    /// To `release`: the address released, if the container held one.
    Released {
        #[serde(deserialize_with = "present")]
        released: Option<Ipv4Addr>,
    },
    /// To `delete_veth`.
    Accepted {},
}

/// A field that must be there, even if null (a missing `Option` field
/// would otherwise read as `None`, and every object as `Released`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
    Option::deserialize(d)
}

/// One reply line: the answer beside `"ok":true`, or `"ok":false` and the
/// error.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum Reply {
    Answer(Answer),
    Error(ApiError),
}

impl From<Result<Answer, ApiError>> for Reply {
    fn from(result: Result<Answer, ApiError>) -> Reply {
        match result {
            Ok(answer) => Reply::Answer(answer),
            Err(error) => Reply::Error(error),
        }
    }
}

impl From<Reply> for Result<Answer, ApiError> {
    fn from(reply: Reply) -> Self {
        match reply {
            Reply::Answer(answer) => Ok(answer),
            Reply::Error(error) => Err(error),
        }
    }
}

impl Reply {
    /// The reply as one line of JSON, newline included.
    pub fn to_line(&self) -> String {
        // Every answer is an object and every field serializes.
        let text = serde_json::to_string(self).expect("a reply serializes");
        text + "\n"
    }

    /// Reads a reply line; never panics on bad input.
    pub fn parse(line: &str) -> Result<Reply, serde_json::Error> {
        serde_json::from_str(line.trim())
    }
}

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let value = match self {
            Reply::Answer(answer) => {
                let mut value = serde_json::to_value(answer).map_err(S::Error::custom)?;
                let Some(fields) = value.as_object_mut() else {
                    return Err(S::Error::custom("an answer is an object"));
                };
                fields.insert("ok".into(), true.into());
                value
            }
            Reply::Error(error) => serde_json::json!({"ok": false, "error": error}),
        };
        value.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Reply {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Reply, D::Error> {
        #[derive(Deserialize)]
        struct Envelope {
            ok: bool,
            #[serde(default)]
            error: Option<ApiError>,
            #[serde(flatten)]
            answer: Answer,
        }
        let envelope = Envelope::deserialize(d)?;
        match (envelope.ok, envelope.error) {
            (true, _) => Ok(Reply::Answer(envelope.answer)),
            (false, Some(error)) => Ok(Reply::Error(error)),
            (false, None) => Err(serde::de::Error::missing_field("error")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment() -> Attachment {
        Attachment {
            container_id: "c1/eth0".into(),
            address: "10.32.0.2/12".parse().unwrap(),
            gateway: Some("10.32.0.1".parse().unwrap()),
        }
    }

    fn node_status() -> NodeStatus {
        NodeStatus {
            ready: false,
            reason: Some("this node has no address space yet".into()),
            bridge: "weft".into(),
            mtu: 1376,
            range: "10.32.0.0/12".parse().unwrap(),
            gateway: None,
        }
    }

    /// Every request as the client writes it, and as the plugin, `weft
    /// rmpeer` and people with `socat` wrote it before (keys in another
    /// order): both read back the same.
    #[test]
    fn requests_have_one_wire_form_and_read_back() {
        let cases = [
            (
                Request::Allocate {
                    container_id: "c1/eth0".into(),
                    wait_ms: Some(20_000),
                },
                r#"{"op":"allocate","container_id":"c1/eth0","wait_ms":20000}"#,
                r#"{"container_id":"c1/eth0","op":"allocate","wait_ms":20000}"#,
            ),
            (
                Request::Allocate {
                    container_id: "c1".into(),
                    wait_ms: None,
                },
                r#"{"op":"allocate","container_id":"c1"}"#,
                r#"{"container_id":"c1","op":"allocate"}"#,
            ),
            (
                Request::Release {
                    container_id: "c1/eth0".into(),
                },
                r#"{"op":"release","container_id":"c1/eth0"}"#,
                r#"{"container_id":"c1/eth0","op":"release"}"#,
            ),
            (
                Request::Check {
                    container_id: "c1/eth0".into(),
                },
                r#"{"op":"check","container_id":"c1/eth0"}"#,
                r#"{"container_id":"c1/eth0","op":"check"}"#,
            ),
            (Request::List {}, r#"{"op":"list"}"#, r#"{"op":"list"}"#),
            (
                Request::Status {},
                r#"{"op":"status"}"#,
                r#"{"op":"status"}"#,
            ),
            (
                Request::RemovePeer {
                    peer: "node2".into(),
                },
                r#"{"op":"remove_peer","peer":"node2"}"#,
                r#"{"op":"remove_peer","peer":"node2"}"#,
            ),
            (
                Request::DeleteVeth {
                    interface: "vethwf1a2b3c4d".into(),
                },
                r#"{"op":"delete_veth","interface":"vethwf1a2b3c4d"}"#,
                r#"{"interface":"vethwf1a2b3c4d","op":"delete_veth"}"#,
            ),
        ];
        for (request, wire, before) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), wire);
            for text in [wire, before] {
                let read: Request = serde_json::from_str(text).unwrap();
                assert_eq!(read, request, "{text}");
            }
        }
    }

    /// Every answer exactly as the agent writes it (keys sorted, `ok`
    /// among them), and read back as the same answer.
    #[test]
    fn replies_have_the_agents_exact_wire_form_and_read_back() {
        let cases = [
            (
                Reply::Answer(Answer::Attachment(attachment())),
                r#"{"address":"10.32.0.2/12","container_id":"c1/eth0","gateway":"10.32.0.1","ok":true}"#,
            ),
            (
                Reply::Answer(Answer::List {
                    allocations: vec![attachment()],
                }),
                r#"{"allocations":[{"address":"10.32.0.2/12","container_id":"c1/eth0","gateway":"10.32.0.1"}],"ok":true}"#,
            ),
            (
                Reply::Answer(Answer::List {
                    allocations: Vec::new(),
                }),
                r#"{"allocations":[],"ok":true}"#,
            ),
            (
                Reply::Answer(Answer::Status(node_status())),
                r#"{"bridge":"weft","gateway":null,"mtu":1376,"ok":true,"range":"10.32.0.0/12","ready":false,"reason":"this node has no address space yet"}"#,
            ),
            (
                Reply::Answer(Answer::Reclaimed { reclaimed: 4096 }),
                r#"{"ok":true,"reclaimed":4096}"#,
            ),
            (
                Reply::Answer(Answer::Released {
                    released: Some("10.32.0.2".parse().unwrap()),
                }),
                r#"{"ok":true,"released":"10.32.0.2"}"#,
            ),
            (
                Reply::Answer(Answer::Released { released: None }),
                r#"{"ok":true,"released":null}"#,
            ),
            (Reply::Answer(Answer::Accepted {}), r#"{"ok":true}"#),
            (
                Reply::Error(ApiError {
                    kind: ErrorKind::Pending,
                    message: "no address for c1 yet".into(),
                }),
                r#"{"error":{"kind":"pending","message":"no address for c1 yet"},"ok":false}"#,
            ),
            (
                Reply::Error(ApiError {
                    kind: ErrorKind::BadRequest,
                    message: "not a valid request".into(),
                }),
                r#"{"error":{"kind":"bad_request","message":"not a valid request"},"ok":false}"#,
            ),
            (
                Reply::Error(ApiError {
                    kind: ErrorKind::Refused,
                    message: "no".into(),
                }),
                r#"{"error":{"kind":"refused","message":"no"},"ok":false}"#,
            ),
            (
                Reply::Error(ApiError {
                    kind: ErrorKind::Unavailable,
                    message: "the weft agent is stopping".into(),
                }),
                r#"{"error":{"kind":"unavailable","message":"the weft agent is stopping"},"ok":false}"#,
            ),
        ];
        for (reply, wire) in cases {
            assert_eq!(reply.to_line(), format!("{wire}\n"));
            assert_eq!(Reply::parse(wire).unwrap(), reply, "{wire}");
        }
    }

    /// What a newer agent might add is read past; an error kind this
    /// build does not know is still an error.
    #[test]
    fn replies_read_past_what_they_do_not_know() {
        let r = Reply::parse(r#"{"ok":true,"reclaimed":3,"took_ms":12}"#).unwrap();
        assert_eq!(r, Reply::Answer(Answer::Reclaimed { reclaimed: 3 }));
        let r = Reply::parse(r#"{"ok":false,"error":{"kind":"quota","message":"m"}}"#).unwrap();
        assert_eq!(
            r,
            Reply::Error(ApiError {
                kind: ErrorKind::Unknown,
                message: "m".into()
            })
        );
    }

    #[test]
    fn unknown_ops_fields_and_garbage_are_typed_errors() {
        for bad in [
            r#"{"op":"allocate"}"#,
            r#"{"op":"format_disk"}"#,
            r#"{"op":"release","container_id":"c","extra":1}"#,
            r#"{"op":"list","all":true}"#,
            r#"{"container_id":"c"}"#,
            r#"{"op":7}"#,
            r#"[]"#,
            "\u{0}\u{1}garbage",
            "",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        for bad in [
            r#"{"ok":false}"#,
            r#"{"ok":false,"error":{"kind":"pending"}}"#,
            r#"{"ok":"yes"}"#,
            r#"{"released":null}"#,
            "null",
            "",
            "{",
        ] {
            assert!(Reply::parse(bad).is_err(), "{bad}");
        }
    }

    /// A reply missing an answer's required field does not pass for that
    /// answer (the client then sees an answer of the wrong kind).
    #[test]
    fn answers_are_told_apart_by_their_required_fields() {
        for text in [
            r#"{"ok":true,"container_id":"c1","gateway":null}"#,
            r#"{"ok":true,"released":"not an address"}"#,
        ] {
            assert_eq!(
                Reply::parse(text).unwrap(),
                Reply::Answer(Answer::Accepted {})
            );
        }
        let r = Reply::parse(r#"{"ok":true,"released":null}"#).unwrap();
        assert_eq!(r, Reply::Answer(Answer::Released { released: None }));
    }
}
