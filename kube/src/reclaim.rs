//! Reclaiming a removed peer's address space exactly once.
//!
//! Weave kept a lock annotation in one ConfigMap and raced (two nodes
//! reclaimed the same peer, or none did). Here each removed peer gets its
//! own coordination.k8s.io/v1 Lease `weft-reclaim-<peer hex>` in weft's own
//! namespace ([`crate::names::NAMESPACE`]), and the API server's create/replace
//! semantics decide:
//!
//! 1. No Lease: `create` it with ourselves as holder. Exactly one create
//!    succeeds; the others get 409 AlreadyExists and back off.
//! 2. Holder runs the agent's [`ReclaimAction`], renewing the Lease every
//!    third of its duration while the action runs, then marks it done
//!    (annotation [`DONE_ANNOTATION`]). A done Lease is never acted on
//!    again, so a late or restarted agent does nothing.
//! 3. A claim that is not done and that this agent has seen unchanged (same
//!    resourceVersion) for the claim's whole leaseDurationSeconds, measured
//!    on its own monotonic clock ([`crate::observed`]), is stale: anyone may
//!    take it over by `replace` with the resourceVersion they read; a 409
//!    means another agent wrote first. Wall-clock times in the Lease are
//!    for people reading it and are never compared: nodes' clocks may differ
//!    by more than a lease duration.
//! 4. The holder acts only within two thirds of a lease duration of sending
//!    its last successful write (an observer waits a whole duration from
//!    after that write), so a holder that stalled (a paused process, a slow
//!    answer) first proves with one more resourceVersion-guarded write that
//!    nobody took over, and backs off on 409. Renewals and the final done
//!    mark carry the resourceVersion of the holder's own last write: a
//!    takeover is detected, never overwritten, and the action is dropped
//!    when a renewal finds the claim lost or expired.
//! 5. A holder that restarts finds its own claim, proves it still holds it
//!    the same way, and finishes it (the action must be idempotent).
//!
//! What a Lease cannot rule out: a holder paused *inside* the action's last
//! step for longer than a lease duration (the effect already happened, but
//! not the done mark); the next holder acts again, which is why the action
//! must be idempotent.
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
use tokio::time::Instant;

use crate::error::{BoxError, Error, Result, api, is_conflict};
use crate::names::{NAMESPACE, NameMap, format_peer_name};
use crate::observed::Observed;

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
/// acting but before marking the Lease done acts again on restart. The
/// future may be dropped before it finishes (the claim was lost).
pub trait ReclaimAction: Send + Sync + 'static {
    fn reclaim(&self, peer: u64) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// The parts of a Lease the decision needs, read from untrusted input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    pub holder: Option<String>,
    pub done: bool,
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
            duration_secs: spec.and_then(|s| s.lease_duration_seconds),
        }
    }

    /// The holder's leaseDurationSeconds, or `fallback` (ours) when it is
    /// missing or not positive: a malformed claim still gets one duration
    /// to show signs of life before it is taken over.
    pub fn duration(&self, fallback: Duration) -> Duration {
        self.duration_secs
            .and_then(|d| u64::try_from(d).ok())
            .filter(|d| *d > 0)
            .map_or(fallback, Duration::from_secs)
    }

    /// True when the claim is not done and was seen unchanged for its
    /// whole duration.
    pub fn is_stale(&self, unchanged_for: Duration, fallback: Duration) -> bool {
        !self.done && unchanged_for >= self.duration(fallback)
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

/// Who may claim: the pure heart of the protocol. `unchanged_for` is how
/// long this agent has seen the Lease's current record (see
/// [`crate::observed`]); `fallback` is our own lease duration.
pub fn decide(
    claim: Option<&Claim>,
    me: &str,
    unchanged_for: Duration,
    fallback: Duration,
    poll: Duration,
) -> Decision {
    let Some(claim) = claim else {
        return Decision::Create;
    };
    if claim.done {
        Decision::Done
    } else if claim.holder.as_deref() == Some(me) {
        Decision::Finish
    } else if claim.is_stale(unchanged_for, fallback) {
        Decision::TakeOver
    } else {
        let left = claim.duration(fallback).saturating_sub(unchanged_for);
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
    /// Another agent (or another task of this one) holds a live claim; try
    /// again after `retry_after`.
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
    /// How long our claim stays valid without a renewal
    /// (leaseDurationSeconds, whole seconds, at least 1).
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

    /// The lease duration as written (whole seconds).
    fn duration(&self) -> Duration {
        Duration::from_secs(u64::from(duration_secs(self.lease_duration).unsigned_abs()))
    }
}

/// Our claim as last written, and until when it is ours for sure.
#[derive(Debug, Clone)]
struct Held {
    lease: Lease,
    /// When the write that produced `lease` was sent, on our clock.
    sent: Instant,
    duration: Duration,
    /// When to renew next while acting.
    renew_at: Instant,
}

impl Held {
    /// Acting is allowed until here: a third of a duration before anyone
    /// else may call the claim stale (margin for clock rate differences).
    fn act_until(&self) -> Instant {
        self.sent + self.duration * 2 / 3
    }

    fn name(&self) -> String {
        self.lease.metadata.name.clone().unwrap_or_default()
    }
}

/// Runs the protocol (verbs: `get`, `create`, `update` leases; plus the
/// [`NameMap`] verbs). Cheap to clone: one per spawned task is fine; the
/// clones share what they observed.
pub struct Reclaimer<A> {
    nodes: Api<Node>,
    leases: Api<Lease>,
    names: NameMap,
    action: Arc<A>,
    cfg: ReclaimConfig,
    observed: Observed,
}

impl<A> Clone for Reclaimer<A> {
    fn clone(&self) -> Self {
        Reclaimer {
            nodes: self.nodes.clone(),
            leases: self.leases.clone(),
            names: self.names.clone(),
            action: self.action.clone(),
            cfg: self.cfg.clone(),
            observed: self.observed.clone(),
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
            observed: Observed::default(),
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
        let Some(_active) = self.observed.begin(&name) else {
            return Ok(Outcome::HeldByOther {
                holder: self.cfg.identity.clone(),
                retry_after: self.cfg.poll,
            });
        };
        for _ in 0..MAX_ROUNDS {
            let current = self.get(&name).await?;
            let version = current
                .as_ref()
                .map(|l| l.metadata.resource_version.clone().unwrap_or_default());
            let unchanged_for = self.observed.unchanged_for(&name, version.as_deref());
            let claim = current.as_ref().map(Claim::of);
            let decision = decide(
                claim.as_ref(),
                &self.cfg.identity,
                unchanged_for,
                self.cfg.duration(),
                self.cfg.poll,
            );
            let held = match decision {
                Decision::Done => {
                    self.observed.forget(&name);
                    return Ok(Outcome::AlreadyDone);
                }
                Decision::Wait(retry_after) => {
                    let holder = claim.and_then(|c| c.holder).unwrap_or_default();
                    return Ok(Outcome::HeldByOther {
                        holder,
                        retry_after,
                    });
                }
                Decision::Create => self.create(node, peer).await?,
                Decision::Finish | Decision::TakeOver => match current {
                    Some(lease) => self.write_claim(lease).await?,
                    None => None,
                },
            };
            // None: another agent wrote first (or took over while we
            // stalled); read again and re-decide.
            if let Some(held) = held
                && let Some(outcome) = self.act_and_mark(held, peer).await?
            {
                self.observed.forget(&name);
                return Ok(outcome);
            }
        }
        Err(Error::Conflict {
            what: format!("claim Lease {name}"),
            tries: MAX_ROUNDS,
        })
    }

    /// Acts under `held`, renewing it meanwhile, and marks it done. `None`
    /// when the claim turned out lost before acting.
    async fn act_and_mark(&self, held: Held, peer: u64) -> Result<Option<Outcome>> {
        let Some(mut held) = self.still_held(held).await? else {
            return Ok(None);
        };
        tracing::info!(peer = %format_peer_name(peer), "reclaiming removed peer's address space");
        let action = self.action.reclaim(peer);
        tokio::pin!(action);
        loop {
            tokio::select! {
                biased;
                done = &mut action => {
                    done.map_err(|source| Error::ReclaimAction { peer, source })?;
                    break;
                }
                () = tokio::time::sleep_until(held.renew_at) => {
                    held = self.renew_while_acting(held).await?;
                }
            }
        }
        self.mark_done(held).await?;
        Ok(Some(Outcome::Reclaimed))
    }

    /// `held` if acting under it is still safe; after a stall past its
    /// acting window, only if one more guarded write succeeds.
    async fn still_held(&self, held: Held) -> Result<Option<Held>> {
        if Instant::now() < held.act_until() {
            return Ok(Some(held));
        }
        tracing::warn!(
            lease = held.name(),
            "claim written too long ago (stalled?); checking nobody took it over"
        );
        self.write_claim(held.lease).await
    }

    /// One renewal during the action. A lost claim (409) or one that could
    /// not be renewed within its acting window ends the action: from then
    /// on another agent may legitimately take over.
    async fn renew_while_acting(&self, held: Held) -> Result<Held> {
        let name = held.name();
        match self.write_claim(held.lease.clone()).await {
            Ok(Some(renewed)) => Ok(renewed),
            Ok(None) => Err(Error::ClaimLost {
                lease: name,
                detail: "another agent wrote it while this one was reclaiming".into(),
            }),
            Err(e) if Instant::now() < held.act_until() => {
                tracing::warn!("cannot renew Lease {name} yet: {e}");
                Ok(Held {
                    renew_at: Instant::now() + held.duration / 10,
                    ..held
                })
            }
            Err(e) => Err(Error::ClaimLost {
                lease: name,
                detail: format!("not renewed in time ({e})"),
            }),
        }
    }

    async fn get(&self, name: &str) -> Result<Option<Lease>> {
        self.leases
            .get_opt(name)
            .await
            .map_err(api(format!("get Lease {name}")))
    }

    /// `Some` if our create won, `None` if another agent's did.
    async fn create(&self, node: &str, peer: u64) -> Result<Option<Held>> {
        let lease = new_claim(node, peer, &self.cfg, now());
        let what = format!("create Lease {}", lease_name(peer));
        let sent = Instant::now();
        let written = self.leases.create(&PostParams::default(), &lease).await;
        Ok(none_on_conflict(written, what)?.map(|lease| self.held(lease, sent)))
    }

    /// Makes us the holder with a fresh renewal (takeover, finishing our
    /// own claim, or renewing it); replace carries the resourceVersion of
    /// `lease`, so it fails (`None`) if anyone wrote since.
    async fn write_claim(&self, mut lease: Lease) -> Result<Option<Held>> {
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
        let sent = Instant::now();
        let written = self
            .leases
            .replace(&name, &PostParams::default(), &lease)
            .await;
        Ok(none_on_conflict(written, what)?.map(|lease| self.held(lease, sent)))
    }

    /// Our write succeeded: remember its record as seen now, so our own
    /// writes never look like someone else's stale claim.
    fn held(&self, lease: Lease, sent: Instant) -> Held {
        let name = lease.metadata.name.clone().unwrap_or_default();
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        self.observed.unchanged_for(&name, Some(&version));
        let duration = self.cfg.duration();
        Held {
            lease,
            sent,
            duration,
            renew_at: sent + duration / 3,
        }
    }

    /// Records completion with the resourceVersion of our last write. A
    /// 409 means someone wrote after it: if that was a takeover the record
    /// is theirs (an error here, never overwritten); if the claim is still
    /// ours (someone only edited it), mark the fresh copy.
    async fn mark_done(&self, held: Held) -> Result<()> {
        let name = held.name();
        let mut lease = held.lease;
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
            let fresh = self.get(&name).await?;
            let claim = fresh.as_ref().map(Claim::of).unwrap_or_default();
            if claim.done {
                return Ok(());
            }
            match (fresh, claim.holder) {
                (Some(fresh), Some(holder)) if holder == self.cfg.identity => lease = fresh,
                (_, holder) => {
                    return Err(Error::ClaimLost {
                        lease: name,
                        detail: format!(
                            "taken over by {} before it was marked done",
                            holder.as_deref().unwrap_or("nobody (deleted)")
                        ),
                    });
                }
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

/// Wall-clock now, for the acquire and renew times people read in the
/// Lease (never compared: see the module comment).
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
    /// Our own lease duration, used for claims without a usable one.
    const OURS: Duration = Duration::from_secs(30);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn claim(holder: &str, duration: i32, done: bool) -> Claim {
        Claim {
            holder: Some(holder.into()),
            done,
            duration_secs: Some(duration),
        }
    }

    fn decide_b(c: &Claim, unchanged_for: u64) -> Decision {
        decide(Some(c), "b", secs(unchanged_for), OURS, POLL)
    }

    #[test]
    fn no_lease_means_create() {
        assert_eq!(decide(None, "a", secs(0), OURS, POLL), Decision::Create);
    }

    #[test]
    fn done_is_final_for_everyone_even_when_expired() {
        let c = claim("a", 60, true);
        assert_eq!(
            decide(Some(&c), "a", secs(1000), OURS, POLL),
            Decision::Done
        );
        assert_eq!(decide_b(&c, 1000), Decision::Done);
        assert!(!c.is_stale(secs(1000), OURS));
    }

    #[test]
    fn own_unfinished_claim_is_finished() {
        let c = claim("a", 60, false);
        assert_eq!(
            decide(Some(&c), "a", secs(10), OURS, POLL),
            Decision::Finish
        );
        assert_eq!(
            decide(Some(&c), "a", secs(1000), OURS, POLL),
            Decision::Finish
        );
    }

    #[test]
    fn live_foreign_claim_means_wait_at_most_poll() {
        let c = claim("a", 60, false);
        assert_eq!(decide_b(&c, 10), Decision::Wait(POLL));
        assert_eq!(decide_b(&c, 58), Decision::Wait(secs(2)));
    }

    #[test]
    fn foreign_claim_is_stale_only_after_a_whole_duration_unchanged() {
        let c = claim("a", 60, false);
        // However old its renewTime, a claim just seen is live: the
        // decision never reads the holder's wall-clock times.
        assert!(matches!(decide_b(&c, 0), Decision::Wait(_)));
        assert!(matches!(decide_b(&c, 59), Decision::Wait(_)));
        assert!(c.is_stale(secs(60), OURS));
        assert_eq!(decide_b(&c, 61), Decision::TakeOver);
    }

    #[test]
    fn malformed_claims_get_our_duration_then_are_taken_over() {
        let no_duration = Claim {
            holder: Some("a".into()),
            ..Default::default()
        };
        let bad_duration = claim("a", -5, false);
        let no_holder = Claim {
            duration_secs: Some(60),
            ..Default::default()
        };
        for c in [&no_duration, &bad_duration] {
            assert_eq!(c.duration(OURS), OURS);
            assert!(matches!(decide_b(c, 1), Decision::Wait(_)));
            assert_eq!(decide_b(c, 30), Decision::TakeOver);
        }
        // Holderless: wait for it to expire rather than guess.
        assert!(matches!(decide_b(&no_holder, 1), Decision::Wait(_)));
        assert_eq!(decide_b(&no_holder, 60), Decision::TakeOver);
    }

    #[test]
    fn claim_reads_lease_fields_and_done_annotation() {
        let cfg = ReclaimConfig::new("a", 1);
        let at = Timestamp::from_second(1_800_000_000).unwrap();
        let mut lease = new_claim("node-x", 0xabc, &cfg, at);
        assert_eq!(
            lease.metadata.name.as_deref(),
            Some("weft-reclaim-0000000000000abc")
        );
        assert_eq!(Claim::of(&lease), claim("a", 60, false));
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
        let c = claim("a", i32::MAX, false);
        assert!(!c.is_stale(secs(365 * 24 * 3600), OURS));
        assert_eq!(decide_b(&c, 3600), Decision::Wait(POLL));
        assert_eq!(duration_secs(Duration::from_secs(u64::MAX)), i32::MAX);
        let cfg = ReclaimConfig {
            lease_duration: Duration::from_millis(10),
            ..ReclaimConfig::new("a", 1)
        };
        assert_eq!(cfg.duration(), secs(1));
    }

    #[test]
    fn the_holder_acts_within_two_thirds_and_renews_at_one_third() {
        let sent = Instant::now();
        let held = Held {
            lease: Lease::default(),
            sent,
            duration: secs(30),
            renew_at: sent + secs(10),
        };
        assert_eq!(held.act_until(), sent + secs(20));
    }
}
