//! A blocking client for the agent's Unix socket: one connection per
//! request, each answer checked to be the kind its request gets.

use crate::socket::{Answer, ApiError, Attachment, NodeStatus, Reply, Request};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a request may take unless the caller says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than its `wait_ms` an allocation may take to answer.
pub const ALLOCATE_MARGIN: Duration = Duration::from_secs(5);
/// Longest reply line read (a `list` of a full node is a few kB).
const MAX_REPLY: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent listens on the socket, or it did not answer in time.
    #[error("weft agent not reachable at {}: {source}", path.display())]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The reply is not a reply, or not one to this request.
    #[error("the weft agent answered nonsense: {0}")]
    Malformed(String),
    /// The agent answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// The agent's local API at a socket path.
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client {
            path: path.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The timeout of the typed calls below (not of allocations, which
    /// take their wait and [`ALLOCATE_MARGIN`]).
    pub fn with_timeout(self, timeout: Duration) -> Client {
        Client { timeout, ..self }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and reads its reply; each read and write waits
    /// at most `timeout`.
    pub fn call(&self, request: &Request, timeout: Duration) -> Result<Answer, ClientError> {
        let line = self.exchange(request, timeout)?;
        let reply = Reply::parse(&line).map_err(|e| ClientError::Malformed(e.to_string()))?;
        Ok(Result::<Answer, ApiError>::from(reply)?)
    }

    fn exchange(&self, request: &Request, timeout: Duration) -> Result<String, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            path: self.path.clone(),
            source,
        };
        let mut text = serde_json::to_string(request).expect("a request serializes");
        text.push('\n');
        let mut stream = UnixStream::connect(&self.path).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .and_then(|()| stream.write_all(text.as_bytes()))
            .map_err(unreachable)?;
        let mut line = String::new();
        BufReader::new(stream.take(MAX_REPLY))
            .read_line(&mut line)
            .map_err(unreachable)?;
        Ok(line)
    }

    /// An address for `container_id`, waiting up to `wait` for space.
    pub fn allocate(&self, container_id: &str, wait: Duration) -> Result<Attachment, ClientError> {
        let request = Request::Allocate {
            container_id: container_id.into(),
            wait_ms: Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        };
        match self.call(&request, wait + ALLOCATE_MARGIN)? {
            Answer::Attachment(a) => Ok(a),
            other => Err(unexpected(&request, other)),
        }
    }

    /// Releases `container_id`'s address: the address, if it held one.
    pub fn release(&self, container_id: &str) -> Result<Option<Ipv4Addr>, ClientError> {
        let request = Request::Release {
            container_id: container_id.into(),
        };
        match self.call(&request, self.timeout)? {
            Answer::Released { released } => Ok(released),
            other => Err(unexpected(&request, other)),
        }
    }

    /// What `container_id` holds.
    pub fn check(&self, container_id: &str) -> Result<Attachment, ClientError> {
        let request = Request::Check {
            container_id: container_id.into(),
        };
        match self.call(&request, self.timeout)? {
            Answer::Attachment(a) => Ok(a),
            other => Err(unexpected(&request, other)),
        }
    }

    /// Every pod's allocation on this node.
    pub fn list(&self) -> Result<Vec<Attachment>, ClientError> {
        match self.call(&Request::List {}, self.timeout)? {
            Answer::List { allocations } => Ok(allocations),
            other => Err(unexpected(&Request::List {}, other)),
        }
    }

    pub fn status(&self) -> Result<NodeStatus, ClientError> {
        match self.call(&Request::Status {}, self.timeout)? {
            Answer::Status(status) => Ok(status),
            other => Err(unexpected(&Request::Status {}, other)),
        }
    }

    /// Reclaims a removed peer's space: how many addresses came back.
    pub fn remove_peer(&self, peer: &str) -> Result<u64, ClientError> {
        let request = Request::RemovePeer { peer: peer.into() };
        match self.call(&request, self.timeout)? {
            Answer::Reclaimed { reclaimed } => Ok(reclaimed),
            other => Err(unexpected(&request, other)),
        }
    }

    /// Has the agent delete a pod's host veth in the background.
    pub fn delete_veth(&self, interface: &str) -> Result<(), ClientError> {
        let request = Request::DeleteVeth {
            interface: interface.into(),
        };
        match self.call(&request, self.timeout)? {
            Answer::Accepted {} => Ok(()),
            other => Err(unexpected(&request, other)),
        }
    }
}

fn unexpected(request: &Request, answer: Answer) -> ClientError {
    ClientError::Malformed(format!(
        "an answer of another kind to {}: {answer:?}",
        request.op()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::ErrorKind;
    use std::os::unix::net::UnixListener;

    /// A stand-in agent answering each connection's first line with the
    /// line `answer` gives for it.
    fn agent(dir: &Path, answer: fn(&str) -> String) -> PathBuf {
        let path = dir.join("weft.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut write = stream.try_clone().unwrap();
                let mut line = String::new();
                let _ = BufReader::new(stream).read_line(&mut line);
                let _ = write.write_all(answer(&line).as_bytes());
            }
        });
        path
    }

    #[test]
    fn an_absent_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(dir.path().join("no.sock"));
        let e = client.status().unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
        assert!(e.to_string().contains("no.sock"), "{e}");
    }

    #[test]
    fn answers_and_errors_come_back_typed() {
        let dir = tempfile::tempdir().unwrap();
        let path = agent(dir.path(), |line| {
            let request: Request = serde_json::from_str(line).unwrap();
            let reply = match request {
                Request::Allocate { container_id, .. } => {
                    Reply::Answer(Answer::Attachment(Attachment {
                        container_id,
                        address: "10.32.0.2/12".parse().unwrap(),
                        gateway: None,
                    }))
                }
                Request::RemovePeer { .. } => Reply::Answer(Answer::Reclaimed { reclaimed: 7 }),
                _ => Reply::Error(ApiError {
                    kind: ErrorKind::Pending,
                    message: "later".into(),
                }),
            };
            reply.to_line()
        });
        let client = Client::new(&path);
        let a = client.allocate("c1", Duration::from_secs(1)).unwrap();
        assert_eq!(a.container_id, "c1");
        assert_eq!(client.remove_peer("node2").unwrap(), 7);
        match client.list() {
            Err(ClientError::Api(e)) => assert_eq!(e.kind, ErrorKind::Pending),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nonsense_and_answers_of_the_wrong_kind_are_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let path = agent(dir.path(), |line| match line.contains("check") {
            true => "{\"ok\":true}\n".into(),
            false => "\u{0}garbage\n".into(),
        });
        let client = Client::new(&path);
        for e in [
            client.check("c1").unwrap_err(),
            client.status().unwrap_err(),
        ] {
            assert!(matches!(e, ClientError::Malformed(_)), "{e:?}");
        }
    }

    #[test]
    fn an_agent_closing_without_a_reply_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let path = agent(dir.path(), |_| String::new());
        let e = Client::new(&path).release("c1").unwrap_err();
        assert!(matches!(e, ClientError::Malformed(_)), "{e:?}");
    }
}
