//! The status server on 127.0.0.1:6784: a human report, JSON views,
//! Prometheus metrics and probes; and, with `--metrics-addr`, a second
//! listener that serves only metrics and probes, for Prometheus to scrape
//! from the network (the status pages name peers, addresses and pods, so
//! they stay on loopback). A deliberately small HTTP/1.1 GET
//! server: one request per connection, bounded request head, bounded
//! time to send it and to take the answer, at most
//! [`MAX_CONNECTIONS`] connections at once.

use crate::serve::limit::{Admitted, ConnectionLimit};
use crate::serve::metrics::Metrics;
use crate::serve::report;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections held at once; beyond, the oldest idle one is closed.
pub const MAX_CONNECTIONS: usize = 64;

#[derive(Clone)]
pub struct StatusServer {
    /// The local API, through which pages read the router's status.
    pub api: crate::serve::api::Api,
    pub metrics: std::rc::Rc<Metrics>,
    pub dataplane: tokio::sync::watch::Receiver<weft_dataplane::status::DataplaneState>,
    /// fastdp's per-peer health, when fastdp runs.
    pub prober: Option<std::sync::Arc<weft_dataplane::probe::Prober>>,
    /// The sleeve's counters, when it runs.
    pub sleeve: Option<std::sync::Arc<weft_dataplane::sleeve::gate::Counters>>,
}

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every page.
    Status,
    /// Only /metrics, /healthz and /readyz.
    Metrics,
}

impl Scope {
    fn pages(self) -> &'static [&'static str] {
        match self {
            Scope::Status => &[
                "/status",
                "/status/peers",
                "/status/connections",
                "/status/ipam",
                "/metrics",
                "/healthz",
                "/readyz",
            ],
            Scope::Metrics => &["/metrics", "/healthz", "/readyz"],
        }
    }

    /// The answer to a path this listener does not serve.
    fn not_found(self, path: &str) -> Page {
        let pages = self.pages();
        let (last, rest) = pages.split_last().unwrap_or((&"", &[]));
        Page::text(
            404,
            format!("no page {path}; try {} or {last}\n", rest.join(", ")),
        )
    }
}

/// An HTTP answer: status code, content type, body.
pub struct Page {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Page {
    fn text(code: u16, body: String) -> Page {
        Page {
            code,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }

    fn json(value: &impl serde::Serialize) -> Page {
        Page {
            code: 200,
            content_type: "application/json",
            body: serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
        }
    }
}

pub async fn serve(listener: TcpListener, server: StatusServer, scope: Scope) {
    let limit = ConnectionLimit::new(MAX_CONNECTIONS);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let server = server.clone();
                // Turned away: dropping the stream closes it.
                limit.spawn(|admitted| connection(stream, server, scope, admitted));
            }
            Err(e) => {
                tracing::warn!("status server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(mut stream: TcpStream, server: StatusServer, scope: Scope, admitted: Admitted) {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await;
    admitted.busy();
    let page = match head {
        Ok(Ok(head)) => match parse_request_line(&head) {
            Ok(("GET", path)) if scope.pages().contains(&path) => server.page(path).await,
            Ok(("GET", path)) => scope.not_found(path),
            Ok((_, _)) => Page::text(405, "only GET is served here\n".into()),
            Err(why) => Page::text(400, format!("{why}\n")),
        },
        Ok(Err(why)) => Page::text(400, format!("{why}\n")),
        Err(_) => return,
    };
    let reason = match page.code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        page.code,
        page.content_type,
        page.body.len(),
        page.body
    );
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn read_head(stream: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return Err(format!("request head longer than {MAX_HEAD} bytes"));
        }
    }
    String::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())
}

/// `GET /path HTTP/1.1` → ("GET", "/path").
pub fn parse_request_line(head: &str) -> Result<(&str, &str), String> {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(path), Some(version))
            if version.starts_with("HTTP/1.") && path.starts_with('/') =>
        {
            Ok((method, path.split('?').next().unwrap_or(path)))
        }
        _ => Err("not an HTTP/1.x request line".into()),
    }
}

impl StatusServer {
    fn dataplane_state(&self) -> weft_dataplane::status::DataplaneState {
        let mut state = self.dataplane.borrow().clone();
        if let Some(prober) = &self.prober {
            state.peers = prober.view();
        }
        state
    }

    pub async fn page(&self, path: &str) -> Page {
        let pages = [
            "/status",
            "/status/peers",
            "/status/connections",
            "/status/ipam",
            "/metrics",
        ];
        if !pages.contains(&path) {
            return self.probe_page(path).await;
        }
        let Ok(status) = self.api.read(|router, now| router.status(now)).await else {
            return Page::text(503, "the weft agent is stopping\n".into());
        };
        match path {
            "/status" => {
                let dataplane = self.dataplane_state();
                Page::text(200, report::text(&status, &dataplane))
            }
            "/status/peers" => Page::json(&status.peers),
            "/status/connections" => Page::json(&weft_api::status::ConnectionsPage {
                connections: status.connections,
                targets: status.targets,
                dropped: status.dropped,
                dataplane: self.dataplane_state(),
            }),
            "/status/ipam" => Page::json(&status.ipam),
            _ => {
                let sleeve = self.sleeve.as_deref();
                let body = self
                    .metrics
                    .render(&status, &self.dataplane_state(), sleeve);
                Page {
                    code: 200,
                    content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                }
            }
        }
    }

    /// The pages that need no status: probes, and what is not a page.
    async fn probe_page(&self, path: &str) -> Page {
        match path {
            "/healthz" => Page::text(200, "ok\n".into()),
            "/readyz" => {
                let status = self.api.status().await;
                match status.reason {
                    None => Page::text(200, "ready\n".into()),
                    Some(why) => Page::text(503, format!("not ready: {why}\n")),
                }
            }
            _ => Scope::Status.not_found(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_listener_serves_no_status_page() {
        for page in ["/metrics", "/healthz", "/readyz"] {
            assert!(Scope::Metrics.pages().contains(&page));
            assert!(Scope::Status.pages().contains(&page));
        }
        for page in [
            "/status",
            "/status/peers",
            "/status/connections",
            "/status/ipam",
        ] {
            assert!(!Scope::Metrics.pages().contains(&page));
            assert!(Scope::Status.pages().contains(&page));
        }
        let page = Scope::Metrics.not_found("/status");
        assert_eq!(page.code, 404);
        assert_eq!(
            page.body,
            "no page /status; try /metrics, /healthz or /readyz\n"
        );
    }

    #[test]
    fn request_lines_parse_and_garbage_is_refused() {
        assert_eq!(
            parse_request_line("GET /status?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(("GET", "/status"))
        );
        assert_eq!(
            parse_request_line("POST /metrics HTTP/1.0\r\n\r\n"),
            Ok(("POST", "/metrics"))
        );
        for bad in [
            "",
            "GET",
            "GET status HTTP/1.1",
            "\u{0}\u{1} / SPDY/3",
            "GET / HTTP/2",
        ] {
            assert!(parse_request_line(bad).is_err(), "{bad:?}");
        }
    }
}
