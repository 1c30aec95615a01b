//! A blocking client for the agent's status server: a plain HTTP/1.1 GET
//! per page (the server closes each connection after its answer), with
//! typed getters for the JSON pages.

use crate::status::{ConnectionsPage, IpamStatus, PeerStatus};
use serde::de::DeserializeOwned;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer read (the largest page, a thousand peers, is ~300 kB).
const MAX_RESPONSE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{0}")]
    Unreachable(#[from] std::io::Error),
    #[error("{path}: HTTP {code}: {}", body.trim())]
    Status {
        path: String,
        code: u16,
        body: String,
    },
    #[error("{path}: {error}")]
    Malformed {
        path: String,
        error: serde_json::Error,
    },
}

/// The status code and body of a GET of `path` from `addr`; a response
/// that is not HTTP reads as code 0.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.take(MAX_RESPONSE).read_to_string(&mut response)?;
    Ok(parse_response(&response))
}

fn parse_response(response: &str) -> (u16, String) {
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The agent's status server at an address.
#[derive(Clone, Copy, Debug)]
pub struct StatusClient {
    pub addr: SocketAddr,
}

impl StatusClient {
    pub fn new(addr: SocketAddr) -> StatusClient {
        StatusClient { addr }
    }

    /// A page's body, if it answered 200.
    pub fn text(&self, path: &str) -> Result<String, StatusError> {
        match get(self.addr, path)? {
            (200, body) => Ok(body),
            (code, body) => Err(StatusError::Status {
                path: path.into(),
                code,
                body,
            }),
        }
    }

    /// A JSON page, read as `T`.
    pub fn json<T: DeserializeOwned>(&self, path: &str) -> Result<T, StatusError> {
        serde_json::from_str(&self.text(path)?).map_err(|error| StatusError::Malformed {
            path: path.into(),
            error,
        })
    }

    /// `/status/peers`: every known peer, this node included.
    pub fn peers(&self) -> Result<Vec<PeerStatus>, StatusError> {
        self.json("/status/peers")
    }

    /// `/status/connections`, with the data path's state read as `D`.
    pub fn connections<D: DeserializeOwned>(&self) -> Result<ConnectionsPage<D>, StatusError> {
        self.json("/status/connections")
    }

    pub fn ipam(&self) -> Result<IpamStatus, StatusError> {
        self.json("/status/ipam")
    }

    /// `/readyz`: `None` when ready, else why not.
    pub fn not_ready(&self) -> Result<Option<String>, StatusError> {
        let (code, body) = get(self.addr, "/readyz")?;
        Ok((code != 200).then(|| body.trim().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn responses_split_into_code_and_body() {
        assert_eq!(
            parse_response("HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\nnot ready: x\n"),
            (503, "not ready: x\n".into())
        );
        for garbage in ["", "HTTP/1.1", "\u{0}\u{1}", "HTTP/1.1 abc OK\r\n\r\n"] {
            assert_eq!(parse_response(garbage).0, 0, "{garbage:?}");
        }
    }

    /// Serves one connection with `response`.
    fn server(response: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(response.as_bytes());
        });
        addr
    }

    #[test]
    fn pages_read_typed_and_errors_say_which_page() {
        let ok = server("HTTP/1.1 200 OK\r\n\r\n[]\n");
        assert!(StatusClient::new(ok).peers().unwrap().is_empty());
        let missing = server("HTTP/1.1 404 Not Found\r\n\r\nno page\n");
        let e = StatusClient::new(missing).ipam().unwrap_err();
        assert!(matches!(e, StatusError::Status { code: 404, .. }), "{e:?}");
        let nonsense = server("HTTP/1.1 200 OK\r\n\r\n{\"peers\":1}");
        let e = StatusClient::new(nonsense).peers().unwrap_err();
        assert!(e.to_string().starts_with("/status/peers: "), "{e}");
    }

    #[test]
    fn nothing_listening_is_unreachable() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = StatusClient::new(addr).not_ready().unwrap_err();
        assert!(matches!(e, StatusError::Unreachable(_)), "{e:?}");
    }
}
