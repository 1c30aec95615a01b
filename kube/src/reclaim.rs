//! Reclaiming a removed peer's address space exactly once.
//!
//! Weave kept a lock annotation in one ConfigMap and raced (two nodes
//! reclaimed the same peer, or none did). Here each removed peer gets its
//! own coordination.k8s.io/v1 Lease `weft-reclaim-<peer hex>` in
//! kube-system, and the API server's create/replace semantics decide:
//!
//! 1. No Lease: `create` it with ourselves as holder. Exactly one create
//!    succeeds; the others get 409 AlreadyExists and back off.
//! 2. Holder runs the agent's [`ReclaimAction`], then marks the Lease
//!    done (annotation [`DONE_ANNOTATION`]). A done Lease is never acted on
//!    again, so a late or restarted agent does nothing.
//! 3. A claim that is not done and whose holder stopped renewing (renewTime
//!    plus leaseDurationSeconds in the past) is stale: anyone may take it over
//!    by `replace` with the resourceVersion they read; a 409 means another
//!    agent took it first. A holder that restarts finds its own claim and
//!    finishes it (the action must be idempotent).
//!
//! The Lease is keyed by peer name, not node name: a node that rejoins
//! under the same name with a new peer name (wiped disk) and is deleted
//! again needs a second, separate reclaim. Done Leases stay as tombstones
//! (a few hundred bytes each) so a delayed delete event cannot reclaim twice.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::error::{BoxError, Error, Result, api, is_conflict};
use crate::names::{NAMESPACE, NameMap, format_peer_name};

/// Annotation set to "true" once the holder's reclaim action succeeded.
pub const DONE_ANNOTATION: &str = "weft-net/reclaimed";
/// Annotation naming the deleted node (for humans reading the Lease).
pub const NODE_ANNOTATION: &str = "weft-net/node";
const LEASE_PREFIX: &str = "weft-reclaim-";
/// Rounds of read-decide-write before an attempt gives up; each round ends
/// early unless another agent wrote in between.
const MAX_ROUNDS: u32 = 5;

/// The Lease guarding the reclaim of `peer`.
pub fn lease_name(peer: u64) -> String {
    format!("{LEASE_PREFIX}{}", format_peer_name(peer))
}

/// What the agent does to take over a removed peer's space (in weft: the
/// same as `weft rmpeer`). Must be idempotent: a holder that crashed after
/// acting but before marking the Lease done acts again on restart.
pub trait ReclaimAction: Send + Sync + 'static {
    fn reclaim(&self, peer: u64) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// The parts of a Lease the decision needs, read from untrusted input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    pub holder: Option<String>,
    pub done: bool,
    /// Last renewal (or acquisition) time.
    pub renewed: Option<Timestamp>,
    pub duration_secs: Option<i32>,
}

impl Claim {
    pub fn of(lease: &Lease) -> Claim {
        let spec = lease.spec.as_ref();
        let done = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DONE_ANNOTATION))
            .is_some_and(|v| v == "true");
        Claim {
            holder: spec.and_then(|s| s.holder_identity.clone()),
            done,
            renewed: spec
                .and_then(|s| s.renew_time.clone().or(s.acquire_time.clone()))
                .map(|t| t.0),
            duration_secs: spec.and_then(|s| s.lease_duration_seconds),
        }
    }

    /// Milliseconds until the claim goes stale; `None` if it has no usable
    /// time or duration (such a claim can never expire by itself, so it
    /// counts as stale rather than blocking the reclaim forever).
    fn remaining_ms(&self, now: Timestamp) -> Option<i64> {
        let renewed = self.renewed?.as_millisecond();
        let duration = i64::from(self.duration_secs.filter(|d| *d > 0)?);
        Some(
            renewed
                .saturating_add(duration * 1000)
                .saturating_sub(now.as_millisecond()),
        )
    }

    /// True when the holder stopped renewing and the claim was not done.
    pub fn is_stale(&self, now: Timestamp) -> bool {
        !self.done && self.remaining_ms(now).is_none_or(|ms| ms <= 0)
    }
}

/// What an agent should do about a removed peer, given the current Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: try to create it.
    Create,
    /// Our own unfinished claim (we restarted mid-way): renew and finish.
    Finish,
    /// Someone else's claim went stale: try to replace it.
    TakeOver,
    /// Someone else holds a live claim: look again after this long.
    Wait(Duration),
    /// Reclaimed already; nothing to do.
    Done,
}

/// Who may claim: the pure heart of the protocol.
pub fn decide(claim: Option<&Claim>, me: &str, now: Timestamp, poll: Duration) -> Decision {
    let Some(claim) = claim else {
        return Decision::Create;
    };
    if claim.done {
        Decision::Done
    } else if claim.holder.as_deref() == Some(me) {
        Decision::Finish
    } else if claim.is_stale(now) {
        Decision::TakeOver
    } else {
        let left = claim.remaining_ms(now).unwrap_or(0).max(0);
        let left = Duration::from_millis(u64::try_from(left).unwrap_or(0));
        // Poll well before expiry: the usual end is the holder marking done.
        Decision::Wait(left.min(poll))
    }
}

/// How one reclaim attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This agent ran the reclaim action and recorded it.
    Reclaimed,
    /// The Lease says it was done already (by anyone).
    AlreadyDone,
    /// Another agent holds a live claim; try again after `retry_after`.
    HeldByOther {
        holder: String,
        retry_after: Duration,
    },
    /// The node has no entry in the name map: no known peer to reclaim.
    NoPeer,
    /// The peer is this agent itself: never reclaim our own space.
    OwnPeer,
    /// A Node of that name exists (again): a late delete event must not
    /// reclaim a node that rejoined.
    NodeExists,
}

/// Settings of a [`Reclaimer`].
#[derive(Debug, Clone)]
pub struct ReclaimConfig {
    /// Holder identity written into Leases; the agent's node name.
    pub identity: String,
    /// This agent's own peer name, which it must never reclaim.
    pub my_peer: u64,
    /// How long a claim stays valid without finishing (leaseDurationSeconds).
    pub lease_duration: Duration,
    /// How often a waiting agent looks at someone else's claim again.
    pub poll: Duration,
}

impl ReclaimConfig {
    /// Defaults: 60 s leases (a local rmpeer takes milliseconds), 5 s polls.
    pub fn new(identity: impl Into<String>, my_peer: u64) -> Self {
        ReclaimConfig {
            identity: identity.into(),
            my_peer,
            lease_duration: Duration::from_secs(60),
            poll: Duration::from_secs(5),
        }
    }
}

/// Runs the protocol (verbs: `get`, `create`, `update` leases; plus the
/// [`NameMap`] verbs). Cheap to clone: one per spawned task is fine.
pub struct Reclaimer<A> {
    nodes: Api<Node>,
    leases: Api<Lease>,
    names: NameMap,
    action: Arc<A>,
    cfg: ReclaimConfig,
}

impl<A> Clone for Reclaimer<A> {
    fn clone(&self) -> Self {
        Reclaimer {
            nodes: self.nodes.clone(),
            leases: self.leases.clone(),
            names: self.names.clone(),
            action: self.action.clone(),
            cfg: self.cfg.clone(),
        }
    }
}

impl<A: ReclaimAction> Reclaimer<A> {
    pub fn new(client: Client, action: A, cfg: ReclaimConfig) -> Self {
        Reclaimer {
            nodes: Api::all(client.clone()),
            leases: Api::namespaced(client.clone(), NAMESPACE),
            names: NameMap::new(client),
            action: Arc::new(action),
            cfg,
        }
    }

    /// One attempt for a deleted Node: find its peer in the name map,
    /// reclaim it, and drop the map entry once the Lease says done.
    pub async fn node_deleted(&self, node: &str) -> Result<Outcome> {
        let Some(peer) = self.names.lookup(node).await? else {
            return Ok(Outcome::NoPeer);
        };
        // Checked after the lookup: if the Node is absent now, `peer` was
        // registered before this deletion, so it is the removed identity.
        let what = format!("get node {node}");
        if self.nodes.get_opt(node).await.map_err(api(what))?.is_some() {
            return Ok(Outcome::NodeExists);
        }
        let outcome = self.reclaim_peer(node, peer).await?;
        if matches!(outcome, Outcome::Reclaimed | Outcome::AlreadyDone) {
            self.names.remove(node, peer).await?;
        }
        Ok(outcome)
    }

    /// [`Self::node_deleted`] until the outcome is final: waits out other
    /// holders (who finish, or go stale and are taken over). Errors are
    /// returned; the caller decides whether to retry later.
    pub async fn node_deleted_until_settled(&self, node: &str) -> Result<Outcome> {
        loop {
            match self.node_deleted(node).await? {
                Outcome::HeldByOther { retry_after, .. } => tokio::time::sleep(retry_after).await,
                settled => return Ok(settled),
            }
        }
    }

    /// Reclaims for every name-map entry whose Node no longer exists, e.g.
    /// Nodes deleted while no agent was watching, or a claim this agent
    /// left unfinished before it restarted. Call at start with
    /// [`crate::NodeList::node_names`].
    pub async fn sweep(&self, live_nodes: &BTreeSet<String>) -> Result<BTreeMap<String, Outcome>> {
        let mut out = BTreeMap::new();
        for node in self.names.entries().await?.into_keys() {
            if !live_nodes.contains(&node) {
                let outcome = self.node_deleted_until_settled(&node).await?;
                out.insert(node, outcome);
            }
        }
        Ok(out)
    }

    /// One attempt to reclaim `peer` (which lived on `node`).
    pub async fn reclaim_peer(&self, node: &str, peer: u64) -> Result<Outcome> {
        if peer == self.cfg.my_peer {
            return Ok(Outcome::OwnPeer);
        }
        let name = lease_name(peer);
        for _ in 0..MAX_ROUNDS {
            let current = self.get(&name).await?;
            let claim = current.as_ref().map(Claim::of);
            let decision = decide(claim.as_ref(), &self.cfg.identity, now(), self.cfg.poll);
            let held = match decision {
                Decision::Done => return Ok(Outcome::AlreadyDone),
                Decision::Wait(retry_after) => {
                    let holder = claim.and_then(|c| c.holder).unwrap_or_default();
                    return Ok(Outcome::HeldByOther {
                        holder,
                        retry_after,
                    });
                }
                Decision::Create => self.create(node, peer).await?,
                Decision::Finish | Decision::TakeOver => self.renew(current).await?,
            };
            // None: another agent wrote first; read again and re-decide.
            if let Some(lease) = held {
                return self.act_and_mark(lease, peer).await;
            }
        }
        Err(Error::Conflict {
            what: format!("claim Lease {name}"),
            tries: MAX_ROUNDS,
        })
    }

    async fn act_and_mark(&self, lease: Lease, peer: u64) -> Result<Outcome> {
        tracing::info!(peer = %format_peer_name(peer), "reclaiming removed peer's address space");
        self.action
            .reclaim(peer)
            .await
            .map_err(|source| Error::ReclaimAction { peer, source })?;
        self.mark_done(lease).await?;
        Ok(Outcome::Reclaimed)
    }

    async fn get(&self, name: &str) -> Result<Option<Lease>> {
        self.leases
            .get_opt(name)
            .await
            .map_err(api(format!("get Lease {name}")))
    }

    /// `Some(lease)` if our create won, `None` if another agent's did.
    async fn create(&self, node: &str, peer: u64) -> Result<Option<Lease>> {
        let lease = new_claim(node, peer, &self.cfg, now());
        let what = format!("create Lease {}", lease_name(peer));
        none_on_conflict(
            self.leases.create(&PostParams::default(), &lease).await,
            what,
        )
    }

    /// Makes us the holder with a fresh renewTime (takeover, or finishing
    /// our own claim); replace carries the read resourceVersion, so of two
    /// agents taking over the same stale claim only one succeeds.
    async fn renew(&self, lease: Option<Lease>) -> Result<Option<Lease>> {
        let Some(mut lease) = lease else {
            return Ok(None);
        };
        let name = lease.metadata.name.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_default();
        let was_mine = spec.holder_identity.as_deref() == Some(&self.cfg.identity);
        if !was_mine {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            spec.acquire_time = Some(MicroTime(now()));
        }
        spec.holder_identity = Some(self.cfg.identity.clone());
        spec.lease_duration_seconds = Some(duration_secs(self.cfg.lease_duration));
        spec.renew_time = Some(MicroTime(now()));
        let what = format!("replace Lease {name}");
        none_on_conflict(
            self.leases
                .replace(&name, &PostParams::default(), &lease)
                .await,
            what,
        )
    }

    /// Records completion. A 409 here means someone rewrote the Lease
    /// after our claim (it went stale while we acted): read and retry, so
    /// the record is kept unless it is already done.
    async fn mark_done(&self, mut lease: Lease) -> Result<()> {
        let name = lease.metadata.name.clone().unwrap_or_default();
        for _ in 0..MAX_ROUNDS {
            lease
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(DONE_ANNOTATION.into(), "true".into());
            let what = format!("mark Lease {name} done");
            let written = self
                .leases
                .replace(&name, &PostParams::default(), &lease)
                .await;
            if none_on_conflict(written, what)?.is_some() {
                return Ok(());
            }
            match self.get(&name).await? {
                Some(fresh) if !Claim::of(&fresh).done => lease = fresh,
                _ => return Ok(()),
            }
        }
        Err(Error::Conflict {
            what: format!("mark Lease {name} done"),
            tries: MAX_ROUNDS,
        })
    }
}

fn none_on_conflict(result: Result<Lease, kube::Error>, what: String) -> Result<Option<Lease>> {
    match result {
        Ok(lease) => Ok(Some(lease)),
        Err(e) if is_conflict(&e) => Ok(None),
        Err(e) => Err(api(what)(e)),
    }
}

/// A fresh claim Lease for `peer`, held by us.
pub fn new_claim(node: &str, peer: u64, cfg: &ReclaimConfig, now: Timestamp) -> Lease {
    let annotations = [(NODE_ANNOTATION.to_string(), node.to_string())].into();
    Lease {
        metadata: ObjectMeta {
            name: Some(lease_name(peer)),
            namespace: Some(NAMESPACE.into()),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(cfg.identity.clone()),
            lease_duration_seconds: Some(duration_secs(cfg.lease_duration)),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    }
}

fn duration_secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX).max(1)
}

/// Wall-clock now. Lease times are compared across machines, so this is
/// the system clock, not a monotonic one.
pub fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Duration = Duration::from_secs(5);

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn claim(holder: &str, renewed: i64, duration: i32, done: bool) -> Claim {
        Claim {
            holder: Some(holder.into()),
            done,
            renewed: Some(at(renewed)),
            duration_secs: Some(duration),
        }
    }

    #[test]
    fn no_lease_means_create() {
        assert_eq!(decide(None, "a", at(0), POLL), Decision::Create);
    }

    #[test]
    fn done_is_final_for_everyone_even_when_expired() {
        let c = claim("a", 0, 60, true);
        assert_eq!(decide(Some(&c), "a", at(1000), POLL), Decision::Done);
        assert_eq!(decide(Some(&c), "b", at(1000), POLL), Decision::Done);
        assert!(!c.is_stale(at(1000)));
    }

    #[test]
    fn own_unfinished_claim_is_finished() {
        let c = claim("a", 0, 60, false);
        assert_eq!(decide(Some(&c), "a", at(10), POLL), Decision::Finish);
        assert_eq!(decide(Some(&c), "a", at(1000), POLL), Decision::Finish);
    }

    #[test]
    fn live_foreign_claim_means_wait_at_most_poll() {
        let c = claim("a", 0, 60, false);
        assert_eq!(decide(Some(&c), "b", at(10), POLL), Decision::Wait(POLL));
        let near_end = decide(Some(&c), "b", at(58), POLL);
        assert_eq!(near_end, Decision::Wait(Duration::from_secs(2)));
    }

    #[test]
    fn expired_foreign_claim_may_be_taken_over() {
        let c = claim("a", 0, 60, false);
        assert!(c.is_stale(at(60)));
        assert_eq!(decide(Some(&c), "b", at(61), POLL), Decision::TakeOver);
    }

    #[test]
    fn malformed_claims_are_stale_not_blocking() {
        let no_time = Claim {
            holder: Some("a".into()),
            duration_secs: Some(60),
            ..Default::default()
        };
        let bad_duration = claim("a", 0, -5, false);
        let no_holder = Claim {
            renewed: Some(at(0)),
            duration_secs: Some(60),
            ..Default::default()
        };
        assert_eq!(decide(Some(&no_time), "b", at(0), POLL), Decision::TakeOver);
        assert_eq!(
            decide(Some(&bad_duration), "b", at(0), POLL),
            Decision::TakeOver
        );
        // Holderless but fresh: wait for it to expire rather than guess.
        assert!(matches!(
            decide(Some(&no_holder), "b", at(1), POLL),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn claim_reads_lease_fields_and_done_annotation() {
        let cfg = ReclaimConfig::new("a", 1);
        let mut lease = new_claim("node-x", 0xabc, &cfg, at(0));
        assert_eq!(
            lease.metadata.name.as_deref(),
            Some("weft-reclaim-0000000000000abc")
        );
        assert_eq!(Claim::of(&lease), claim("a", 0, 60, false));
        lease
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(DONE_ANNOTATION.into(), "true".into());
        assert!(Claim::of(&lease).done);
        assert_eq!(Claim::of(&Lease::default()), Claim::default());
    }

    #[test]
    fn huge_durations_do_not_overflow() {
        let c = Claim {
            holder: Some("a".into()),
            renewed: Some(Timestamp::MAX),
            duration_secs: Some(i32::MAX),
            done: false,
        };
        assert!(!c.is_stale(Timestamp::MIN));
        assert_eq!(duration_secs(Duration::from_secs(u64::MAX)), i32::MAX);
    }
}
