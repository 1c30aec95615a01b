//! A kube Client with faults injected between an agent and the API server:
//! a held answer (the agent stalls right after its write reached the
//! server, like a paused process) and a skewed wall clock (every Lease time
//! the agent writes is shifted, as a node whose clock is off would write).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Method, Request, Response, header};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::SignedDuration;
use kube::Client;
use kube::client::Body;
use tokio::sync::oneshot;

#[derive(Clone, Default)]
pub struct Faults {
    hold_create: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    skew: Arc<Mutex<SignedDuration>>,
}

impl Faults {
    /// The answer to the next Lease create reaches the agent only once
    /// the returned sender fires (or is dropped).
    pub fn hold_next_lease_create(&self) -> oneshot::Sender<()> {
        let (release, held) = oneshot::channel();
        *self.hold_create.lock().unwrap() = Some(held);
        release
    }

    /// The agent's wall clock is off by `skew`.
    pub fn set_skew(&self, skew: SignedDuration) {
        *self.skew.lock().unwrap() = skew;
    }

    /// `inner` (the agent's real client) behind these faults.
    pub fn client(&self, inner: Client) -> Client {
        let svc = Faulty {
            inner,
            faults: self.clone(),
        };
        Client::new(svc, weft_kube::names::NAMESPACE)
    }

    async fn skew_lease_times(&self, req: Request<Body>) -> Result<Request<Body>, kube::Error> {
        let skew = *self.skew.lock().unwrap();
        if skew.is_zero() {
            return Ok(req);
        }
        let (mut parts, body) = req.into_parts();
        let mut lease: Lease = serde_json::from_slice(&body.collect_bytes().await?)
            .map_err(kube::Error::SerdeError)?;
        if let Some(spec) = lease.spec.as_mut() {
            for t in [&mut spec.acquire_time, &mut spec.renew_time]
                .into_iter()
                .flatten()
            {
                *t = MicroTime(t.0.checked_add(skew).unwrap());
            }
        }
        let bytes = serde_json::to_vec(&lease).map_err(kube::Error::SerdeError)?;
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Request::from_parts(parts, Body::from(bytes)))
    }
}

struct Faulty {
    inner: Client,
    faults: Faults,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, kube::Error>> + Send>>;

impl tower_service::Service<Request<Body>> for Faulty {
    type Response = Response<Body>;
    type Error = kube::Error;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), kube::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Answer {
        let inner = self.inner.clone();
        let faults = self.faults.clone();
        Box::pin(async move {
            let lease_write = req.uri().path().contains("/leases")
                && matches!(*req.method(), Method::POST | Method::PUT);
            if !lease_write {
                return inner.send(req).await;
            }
            let hold = match *req.method() {
                Method::POST => faults.hold_create.lock().unwrap().take(),
                _ => None,
            };
            let req = faults.skew_lease_times(req).await?;
            let answer = inner.send(req).await;
            if let Some(held) = hold {
                let _ = held.await;
            }
            answer
        })
    }
}
