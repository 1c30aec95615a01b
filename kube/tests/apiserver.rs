//! weft-kube against a real kube-apiserver (v1.20.2 from ci/kube-apiserver.sh).
//!
//! Skipped (each test prints a note and passes) unless:
//!   WEFT_KUBE_TESTS=1
//!   KUBECONFIG_ADMIN=/tmp/weft-kube/admin.kubeconfig   (system:masters)
//!   KUBECONFIG_WEFT=/tmp/weft-kube/weft.kubeconfig     (the weft service account)
//! `bash ci/kube-test.sh` sets all three. Run with `--test-threads=1`: one
//! test stops and restarts the API server.
//!
//! `policy_inputs_latency_with_1000_pods` is a measurement (change ->
//! published snapshot, p50/p99) and runs only with WEFT_KUBE_BENCH=1:
//!   bash ci/kube-apiserver.sh up   # then, with the variables above:
//!   WEFT_KUBE_BENCH=1 cargo test -p weft-kube --test apiserver policy_inputs_latency -- --nocapture
//!   bash ci/kube-apiserver.sh down
//!
//! Setup applies the RBAC objects of deploy/weft.yaml as admin; everything
//! the crate does then runs with the weft token, so the tests prove the
//! RBAC is enough. Only test fixtures (Nodes and their status, a crashed
//! agent's Lease) are written as admin. The server restart runs
//! `ci/kube-apiserver.sh stop-apiserver|start-apiserver` on the directory
//! holding KUBECONFIG_ADMIN.

mod common;
mod faults;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use weft_kube::names::NAMESPACE;
use weft_kube::reclaim::{Claim, lease_name, new_claim};
use weft_kube::{
    BoxError, NameMap, NodeChange, Outcome, ReclaimAction, ReclaimConfig, Reclaimer, condition,
};

struct Env {
    admin: Client,
    weft: Client,
    kube_dir: PathBuf,
}

/// The clients, or `None` (test skipped) when the server is not configured.
async fn env(test: &str) -> Option<Env> {
    let vars = (
        std::env::var("WEFT_KUBE_TESTS"),
        std::env::var("KUBECONFIG_ADMIN"),
        std::env::var("KUBECONFIG_WEFT"),
    );
    let (Ok(on), Ok(admin), Ok(weft)) = vars else {
        eprintln!("{test}: skipped (set WEFT_KUBE_TESTS=1, KUBECONFIG_ADMIN, KUBECONFIG_WEFT)");
        return None;
    };
    if on != "1" {
        eprintln!("{test}: skipped (WEFT_KUBE_TESTS is not 1)");
        return None;
    }
    let admin_path = PathBuf::from(admin);
    let env = Env {
        admin: weft_kube::connect_kubeconfig(&admin_path).await.unwrap(),
        weft: weft_kube::connect_kubeconfig(Path::new(&weft))
            .await
            .unwrap(),
        kube_dir: admin_path.parent().unwrap().to_path_buf(),
    };
    apply_rbac(&env.admin).await;
    wait_until_authorized(&env.weft).await;
    Some(env)
}

async fn apply<K>(api: Api<K>, obj: &K)
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap();
    let pp = PatchParams::apply("weft-kube-test").force();
    api.patch(&name, &pp, &Patch::Apply(obj)).await.unwrap();
}

/// Server-side apply of weft's namespace, its ConfigMap and every RBAC
/// object in deploy/weft.yaml, as admin.
async fn apply_rbac(admin: &Client) {
    let d = common::load();
    for o in &d.namespaces {
        apply(Api::all(admin.clone()), o).await;
    }
    for o in &d.config_maps {
        let ns = o.metadata.namespace.as_deref().unwrap();
        apply(Api::namespaced(admin.clone(), ns), o).await;
    }
    for o in &d.service_accounts {
        apply(Api::namespaced(admin.clone(), "kube-system"), o).await;
    }
    for o in &d.roles {
        let ns = o.metadata.namespace.as_deref().unwrap();
        apply(Api::namespaced(admin.clone(), ns), o).await;
    }
    for o in &d.role_bindings {
        let ns = o.metadata.namespace.as_deref().unwrap();
        apply(Api::namespaced(admin.clone(), ns), o).await;
    }
    for o in &d.cluster_roles {
        apply(Api::all(admin.clone()), o).await;
    }
    for o in &d.cluster_role_bindings {
        apply(Api::all(admin.clone()), o).await;
    }
}

/// RBAC changes reach the authorizer through an informer: wait for them.
async fn wait_until_authorized(weft: &Client) {
    let leases: Api<Lease> = Api::namespaced(weft.clone(), NAMESPACE);
    for _ in 0..100 {
        let nodes = weft_kube::list_nodes(weft).await;
        let lease = leases.get_opt("weft-reclaim-probe").await;
        if nodes.is_ok() && lease.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("weft service account never became authorized");
}

/// A node name no earlier run used.
fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t-{tag}-{:x}", nanos % 0xffff_ffff_ffff)
}

/// Creates a Node and, as the kubelet would, reports its InternalIP.
async fn create_node(admin: &Client, name: &str, ip: &str) {
    let nodes: Api<Node> = Api::all(admin.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let status = serde_json::json!({
        "status": { "addresses": [{ "type": "InternalIP", "address": ip }] }
    });
    let pp = PatchParams::default();
    nodes
        .patch_status(name, &pp, &Patch::Merge(status))
        .await
        .unwrap();
}

async fn delete_node(admin: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(admin.clone());
    let _ = nodes.delete(name, &DeleteParams::default()).await;
}

/// Polls `changes` until `want` holds, failing after `limit`.
async fn wait_for<S>(changes: &mut S, limit: Duration, want: impl Fn(&NodeChange) -> bool)
where
    S: Stream<Item = NodeChange> + Unpin,
{
    let found = tokio::time::timeout(limit, async {
        while let Some(change) = changes.next().await {
            if want(&change) {
                return;
            }
        }
        panic!("node_changes ended");
    });
    found.await.expect("expected change within the limit");
}

fn peers_have(change: &NodeChange, name: &str) -> bool {
    matches!(change, NodeChange::Peers(p) if p.iter().any(|p| p.node_name == name))
}

fn peers_lack(change: &NodeChange, name: &str) -> bool {
    matches!(change, NodeChange::Peers(p) if !p.iter().any(|p| p.node_name == name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_sees_nodes_come_and_go() {
    let Some(env) = env("discovery_sees_nodes_come_and_go").await else {
        return;
    };
    let (a, b) = (unique("disc-a"), unique("disc-b"));
    create_node(&env.admin, &a, "192.0.2.11").await;

    let list = weft_kube::list_nodes(&env.weft).await.unwrap();
    assert!(list.node_names.contains(&a));
    let pa = list.peers.iter().find(|p| p.node_name == a).unwrap();
    assert_eq!(pa.addr.to_string(), "192.0.2.11");

    let mut changes = Box::pin(weft_kube::node_changes(env.weft.clone()));
    wait_for(&mut changes, Duration::from_secs(20), |c| peers_have(c, &a)).await;
    create_node(&env.admin, &b, "192.0.2.12").await;
    wait_for(&mut changes, Duration::from_secs(20), |c| peers_have(c, &b)).await;
    delete_node(&env.admin, &a).await;
    wait_for(&mut changes, Duration::from_secs(20), |c| {
        *c == NodeChange::Deleted(a.clone())
    })
    .await;
    wait_for(&mut changes, Duration::from_secs(20), |c| peers_lack(c, &a)).await;
    delete_node(&env.admin, &b).await;
}

/// Counts calls; sleeps a little so racing agents overlap.
#[derive(Clone, Default)]
struct FakeReclaim {
    calls: Arc<AtomicUsize>,
}

impl ReclaimAction for FakeReclaim {
    async fn reclaim(&self, _peer: u64) -> Result<(), BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }
}

fn reclaimer(weft: &Client, id: &str, action: &FakeReclaim) -> Reclaimer<FakeReclaim> {
    let mut cfg = ReclaimConfig::new(id, 0x1);
    cfg.poll = Duration::from_millis(300);
    cfg.lease_duration = Duration::from_secs(30);
    Reclaimer::new(weft.clone(), action.clone(), cfg)
}

fn test_peer() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    (nanos as u64) | 0x1000_0000_0000_0000
}

async fn lease_claim(weft: &Client, peer: u64) -> Option<Claim> {
    let leases: Api<Lease> = Api::namespaced(weft.clone(), NAMESPACE);
    leases
        .get_opt(&lease_name(peer))
        .await
        .unwrap()
        .as_ref()
        .map(Claim::of)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_race_and_exactly_one_reclaims() {
    let Some(env) = env("three_agents_race_and_exactly_one_reclaims").await else {
        return;
    };
    let node = unique("gone");
    let peer = test_peer();
    create_node(&env.admin, &node, "192.0.2.21").await;
    let names = NameMap::new(env.weft.clone());
    assert_eq!(names.register(&node, peer).await.unwrap(), None);
    assert_eq!(names.register(&node, peer).await.unwrap(), None);

    let fake = FakeReclaim::default();
    let agents: Vec<_> = ["agent-1", "agent-2", "agent-3"]
        .iter()
        .map(|id| reclaimer(&env.weft, id, &fake))
        .collect();
    // While the Node exists, a (stale) delete event reclaims nothing.
    assert_eq!(
        agents[0].node_deleted(&node).await.unwrap(),
        Outcome::NodeExists
    );
    delete_node(&env.admin, &node).await;

    let (r1, r2, r3) = tokio::join!(
        agents[0].node_deleted_until_settled(&node),
        agents[1].node_deleted_until_settled(&node),
        agents[2].node_deleted_until_settled(&node),
    );
    let outcomes = [r1.unwrap(), r2.unwrap(), r3.unwrap()];
    eprintln!("outcomes: {outcomes:?}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    let winners = outcomes
        .iter()
        .filter(|o| **o == Outcome::Reclaimed)
        .count();
    assert_eq!(winners, 1);
    let claim = lease_claim(&env.weft, peer).await.unwrap();
    assert!(claim.done);
    assert_eq!(names.lookup(&node).await.unwrap(), None);

    // The winner restarts (a new Reclaimer, same identity): nothing again.
    let winner = outcomes
        .iter()
        .position(|o| *o == Outcome::Reclaimed)
        .unwrap();
    let id = claim.holder.unwrap();
    assert_eq!(id, format!("agent-{}", winner + 1));
    let restarted = reclaimer(&env.weft, &id, &fake);
    assert_eq!(
        restarted.node_deleted(&node).await.unwrap(),
        Outcome::NoPeer
    );
    let again = restarted.reclaim_peer(&node, peer).await.unwrap();
    assert_eq!(again, Outcome::AlreadyDone);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);

    // The bare Lease protocol, all three starting at the same instant: one
    // create wins, the others see a live claim (the action takes 200 ms).
    let peer = test_peer();
    let (r1, r2, r3) = tokio::join!(
        agents[0].reclaim_peer(&node, peer),
        agents[1].reclaim_peer(&node, peer),
        agents[2].reclaim_peer(&node, peer),
    );
    let outcomes = [r1.unwrap(), r2.unwrap(), r3.unwrap()];
    eprintln!("bare race: {outcomes:?}");
    let winners = outcomes
        .iter()
        .filter(|o| **o == Outcome::Reclaimed)
        .count();
    assert_eq!(winners, 1);
    // AlreadyDone only if a loser was scheduled 200 ms late (loaded CI).
    let losers = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::HeldByOther { .. } | Outcome::AlreadyDone));
    assert_eq!(losers.count(), 2);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
}

/// Writes a claim as if an agent had crashed after claiming (`age`
/// seconds ago by its clock, with a short lease).
async fn crashed_claim(admin: &Client, node: &str, peer: u64, holder: &str, age: i64) {
    let mut cfg = ReclaimConfig::new(holder, 0x2);
    cfg.lease_duration = SHORT_LEASE;
    let when = weft_kube::reclaim::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(age))
        .unwrap();
    let mut lease = new_claim(node, peer, &cfg, when);
    lease.spec.as_mut().unwrap().renew_time = Some(MicroTime(when));
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    leases.create(&PostParams::default(), &lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_claims_are_finished_or_taken_over() {
    let Some(env) = env("unfinished_claims_are_finished_or_taken_over").await else {
        return;
    };
    let fake = FakeReclaim::default();
    let names = NameMap::new(env.weft.clone());

    // The holder restarted mid-way: others wait, the holder finishes.
    let (first, peer) = (unique("midway"), test_peer());
    names.register(&first, peer).await.unwrap();
    crashed_claim(&env.admin, &first, peer, "agent-a", 0).await;
    let other = reclaimer(&env.weft, "agent-b", &fake);
    let held = other.node_deleted(&first).await.unwrap();
    assert!(matches!(held, Outcome::HeldByOther { ref holder, .. } if holder == "agent-a"));
    let holder = reclaimer(&env.weft, "agent-a", &fake);
    assert_eq!(
        holder.node_deleted(&first).await.unwrap(),
        Outcome::Reclaimed
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);

    // The holder died for good: its claim expires and one agent takes over.
    let (node, peer) = (unique("stale"), test_peer());
    names.register(&node, peer).await.unwrap();
    crashed_claim(&env.admin, &node, peer, "agent-dead", 3600).await;
    let live = [
        reclaimer(&env.weft, "agent-b", &fake),
        reclaimer(&env.weft, "agent-c", &fake),
    ];
    let (r1, r2) = tokio::join!(
        live[0].node_deleted_until_settled(&node),
        live[1].node_deleted_until_settled(&node),
    );
    eprintln!("takeover outcomes: {r1:?} {r2:?}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    let claim = lease_claim(&env.weft, peer).await.unwrap();
    assert!(claim.done);
    assert_ne!(claim.holder.as_deref(), Some("agent-dead"));

    // A sweep at start-up leaves settled nodes alone.
    let live_nodes = weft_kube::list_nodes(&env.weft).await.unwrap().node_names;
    let sweep_fake = FakeReclaim::default();
    let swept = reclaimer(&env.weft, "agent-d", &sweep_fake)
        .sweep(&live_nodes)
        .await
        .unwrap();
    eprintln!("sweep (may include leftovers of earlier runs): {swept:?}");
    assert!(!swept.contains_key(&node) && !swept.contains_key(&first));
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
}

/// Lease of the stall and skew tests: short, so that takeovers are quick.
const SHORT_LEASE: Duration = Duration::from_secs(2);

/// Records which agent reclaimed which peer; takes `work` to do it.
#[derive(Clone)]
struct LoggedReclaim {
    agent: String,
    work: Duration,
    log: Arc<std::sync::Mutex<Vec<(String, u64)>>>,
}

impl ReclaimAction for LoggedReclaim {
    async fn reclaim(&self, peer: u64) -> Result<(), BoxError> {
        self.log.lock().unwrap().push((self.agent.clone(), peer));
        tokio::time::sleep(self.work).await;
        Ok(())
    }
}

/// Agents sharing one log of reclaims, each with a short lease.
#[derive(Default)]
struct Agents {
    log: Arc<std::sync::Mutex<Vec<(String, u64)>>>,
}

impl Agents {
    fn agent(&self, client: &Client, id: &str, work: Duration) -> Reclaimer<LoggedReclaim> {
        let mut cfg = ReclaimConfig::new(id, 0x1);
        cfg.poll = Duration::from_millis(200);
        cfg.lease_duration = SHORT_LEASE;
        let action = LoggedReclaim {
            agent: id.into(),
            work,
            log: self.log.clone(),
        };
        Reclaimer::new(client.clone(), action, cfg)
    }

    /// Who reclaimed `peer`: exactly one agent, or the test fails.
    fn only_reclaimer_of(&self, peer: u64) -> String {
        let log = self.log.lock().unwrap();
        let by: Vec<&str> = log
            .iter()
            .filter(|(_, p)| *p == peer)
            .map(|(a, _)| a.as_str())
            .collect();
        assert_eq!(by.len(), 1, "reclaims of {peer:x}: {by:?}");
        by[0].to_string()
    }
}

/// `reclaim_peer` until the outcome is final, within `limit`.
async fn settle(r: &Reclaimer<LoggedReclaim>, peer: u64, limit: Duration) -> Outcome {
    let settled = tokio::time::timeout(limit, async {
        loop {
            match r.reclaim_peer("t-node", peer).await.unwrap() {
                Outcome::HeldByOther { retry_after, .. } => tokio::time::sleep(retry_after).await,
                done => return done,
            }
        }
    });
    settled.await.expect("reclaim settled within the limit")
}

/// Waits until the claim Lease of `peer` exists.
async fn claimed(weft: &Client, peer: u64) -> Claim {
    for _ in 0..200 {
        if let Some(c) = lease_claim(weft, peer).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no claim Lease for {peer:x}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_stalled_past_its_lease_does_not_reclaim_after_a_takeover() {
    let Some(env) = env("holder_stalled_past_its_lease_does_not_reclaim_after_a_takeover").await
    else {
        return;
    };
    let agents = Agents::default();
    let faults = faults::Faults::default();
    let stalled = agents.agent(&faults.client(env.weft.clone()), "agent-a", Duration::ZERO);
    let other = agents.agent(&env.weft, "agent-b", Duration::ZERO);
    let peer = test_peer();

    // a's create reaches the server, then a stalls (its answer is held).
    let release = faults.hold_next_lease_create();
    let a = tokio::spawn(async move { stalled.reclaim_peer("t-node", peer).await });
    assert_eq!(
        claimed(&env.weft, peer).await.holder.as_deref(),
        Some("agent-a")
    );
    // b sees a's claim unchanged for a whole lease, takes over, reclaims.
    assert_eq!(
        settle(&other, peer, Duration::from_secs(30)).await,
        Outcome::Reclaimed
    );
    // a wakes up more than a lease after its write: it must not act.
    release.send(()).unwrap();
    assert_eq!(a.await.unwrap().unwrap(), Outcome::AlreadyDone);
    assert_eq!(agents.only_reclaimer_of(peer), "agent-b");
    let claim = lease_claim(&env.weft, peer).await.unwrap();
    assert!(claim.done);
    assert_eq!(claim.holder.as_deref(), Some("agent-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_longer_than_the_lease_keeps_its_claim() {
    let Some(env) = env("reclaim_longer_than_the_lease_keeps_its_claim").await else {
        return;
    };
    let agents = Agents::default();
    let slow = agents.agent(&env.weft, "agent-a", SHORT_LEASE * 3);
    let other = agents.agent(&env.weft, "agent-b", Duration::ZERO);
    // a renews while it works: b never sees a stale claim.
    first_keeps_its_claim(&env, &agents, slow, &other).await;
}

/// `first` claims and reclaims (as agent-a); `other`, trying meanwhile,
/// must find the claim live until it is done.
async fn first_keeps_its_claim(
    env: &Env,
    agents: &Agents,
    first: Reclaimer<LoggedReclaim>,
    other: &Reclaimer<LoggedReclaim>,
) {
    let peer = test_peer();
    let task = tokio::spawn(async move { first.reclaim_peer("t-node", peer).await });
    claimed(&env.weft, peer).await;
    assert_eq!(
        settle(other, peer, Duration::from_secs(30)).await,
        Outcome::AlreadyDone
    );
    assert_eq!(task.await.unwrap().unwrap(), Outcome::Reclaimed);
    assert_eq!(agents.only_reclaimer_of(peer), "agent-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_between_agents_keeps_one_reclaim() {
    let Some(env) = env("clock_skew_between_agents_keeps_one_reclaim").await else {
        return;
    };
    let hour = k8s_openapi::jiff::SignedDuration::from_hours(1);
    let agents = Agents::default();

    // a's clock is an hour behind: its fresh claim looks an hour old.
    let behind = faults::Faults::default();
    behind.set_skew(-hour);
    let a = agents.agent(&behind.client(env.weft.clone()), "agent-a", SHORT_LEASE * 2);
    let b = agents.agent(&env.weft, "agent-b", Duration::ZERO);
    first_keeps_its_claim(&env, &agents, a, &b).await;

    // c's clock is an hour ahead and c dies right after claiming: its
    // claim looks valid for another hour, yet b takes over after a lease.
    let ahead = faults::Faults::default();
    ahead.set_skew(hour);
    let c = agents.agent(&ahead.client(env.weft.clone()), "agent-c", Duration::ZERO);
    let peer = test_peer();
    let _never = ahead.hold_next_lease_create();
    let task = tokio::spawn(async move { c.reclaim_peer("t-node", peer).await });
    claimed(&env.weft, peer).await;
    assert_eq!(
        settle(&b, peer, Duration::from_secs(30)).await,
        Outcome::Reclaimed
    );
    task.abort();
    assert_eq!(agents.only_reclaimer_of(peer), "agent-b");
}

/// Tells the test it started, then waits for the test to let it finish.
struct GatedReclaim {
    started: tokio::sync::mpsc::UnboundedSender<()>,
    finish: Arc<tokio::sync::Notify>,
}

impl ReclaimAction for GatedReclaim {
    async fn reclaim(&self, _peer: u64) -> Result<(), BoxError> {
        let _ = self.started.send(());
        self.finish.notified().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_mark_never_overwrites_a_takeover() {
    let Some(env) = env("done_mark_never_overwrites_a_takeover").await else {
        return;
    };
    let (started, mut has_started) = tokio::sync::mpsc::unbounded_channel();
    let finish = Arc::new(tokio::sync::Notify::new());
    let action = GatedReclaim {
        started,
        finish: finish.clone(),
    };
    let mut cfg = ReclaimConfig::new("agent-a", 0x1);
    cfg.lease_duration = SHORT_LEASE;
    let a = Reclaimer::new(env.weft.clone(), action, cfg);
    let peer = test_peer();
    let task = tokio::spawn(async move { a.reclaim_peer("t-node", peer).await });
    has_started.recv().await.unwrap();
    // While a acts, agent-b takes the claim over (written here as admin).
    let leases: Api<Lease> = Api::namespaced(env.admin.clone(), NAMESPACE);
    let mut lease = leases.get(&lease_name(peer)).await.unwrap();
    lease.spec.as_mut().unwrap().holder_identity = Some("agent-b".into());
    leases
        .replace(&lease_name(peer), &PostParams::default(), &lease)
        .await
        .unwrap();
    finish.notify_one();
    let lost = task.await.unwrap();
    assert!(lost.is_err(), "a noticed the takeover: {lost:?}");
    let claim = lease_claim(&env.weft, peer).await.unwrap();
    assert_eq!(claim.holder.as_deref(), Some("agent-b"));
    assert!(!claim.done, "b's claim is b's to mark done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_reports_its_previous_peer_name() {
    let Some(env) = env("wiped_node_reports_its_previous_peer_name").await else {
        return;
    };
    let names = NameMap::new(env.weft.clone());
    let node = unique("wiped");
    let (old, new) = (test_peer(), test_peer() ^ 0xff);
    assert_eq!(names.register(&node, old).await.unwrap(), None);
    assert_eq!(names.register(&node, new).await.unwrap(), Some(old));
    assert_eq!(names.lookup(&node).await.unwrap(), Some(new));
    assert!(
        !names.remove(&node, old).await.unwrap(),
        "entry names the new peer"
    );
    assert!(names.remove(&node, new).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_condition_is_set() {
    let Some(env) = env("network_condition_is_set").await else {
        return;
    };
    let node = unique("cond");
    create_node(&env.admin, &node, "192.0.2.31").await;
    weft_kube::set_network_available(&env.weft, &node)
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(env.admin.clone());
    let read = nodes.get(&node).await.unwrap();
    let c = condition::network_condition(&read).unwrap().clone();
    assert_eq!(c.status, "False");
    assert_eq!(c.reason.as_deref(), Some("WeftIsUp"));
    assert!(c.last_transition_time.is_some());
    // Addresses reported by the "kubelet" survive the strategic merge.
    assert!(weft_kube::peer_of(&read).is_some());

    tokio::time::sleep(Duration::from_millis(1100)).await;
    weft_kube::set_network_available(&env.weft, &node)
        .await
        .unwrap();
    let again = nodes.get(&node).await.unwrap();
    let c2 = condition::network_condition(&again).unwrap();
    assert_eq!(c2.last_transition_time, c.last_transition_time);
    assert_ne!(c2.last_heartbeat_time, c.last_heartbeat_time);
    delete_node(&env.admin, &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_token_has_no_more_than_it_needs() {
    let Some(env) = env("weft_token_has_no_more_than_it_needs").await else {
        return;
    };
    let secrets: Api<Secret> = Api::namespaced(env.weft.clone(), NAMESPACE);
    let denied = secrets.list(&Default::default()).await.unwrap_err();
    assert!(matches!(denied, kube::Error::Api(s) if s.code == 403));
    let nodes: Api<Node> = Api::all(env.weft.clone());
    let denied = nodes.delete("no-such-node", &DeleteParams::default()).await;
    assert!(matches!(denied, Err(kube::Error::Api(s)) if s.code == 403));
    // The NetworkPolicy inputs are read-only, and only listed and watched.
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let pods: Api<Pod> = Api::namespaced(env.weft.clone(), "default");
    pods.list(&Default::default()).await.unwrap();
    let denied = pods.get("no-such-pod").await;
    assert!(matches!(denied, Err(kube::Error::Api(s)) if s.code == 403));
    let denied = pods.delete("no-such-pod", &DeleteParams::default()).await;
    assert!(matches!(denied, Err(kube::Error::Api(s)) if s.code == 403));
    let namespaces: Api<Namespace> = Api::all(env.weft.clone());
    let denied = namespaces.get("default").await;
    assert!(matches!(denied, Err(kube::Error::Api(s)) if s.code == 403));
    let policies: Api<NetworkPolicy> = Api::namespaced(env.weft.clone(), "default");
    policies.list(&Default::default()).await.unwrap();
    let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "weft-may-not" }, "spec": { "podSelector": {} }
    }))
    .unwrap();
    let denied = policies.create(&PostParams::default(), &np).await;
    assert!(matches!(denied, Err(kube::Error::Api(s)) if s.code == 403));
}

fn kube_script(dir: &Path, verb: &str) -> impl Future<Output = ()> + use<> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/kube-apiserver.sh");
    let dir = dir.to_path_buf();
    let verb = verb.to_string();
    async move {
        let status = tokio::task::spawn_blocking(move || {
            std::process::Command::new("bash")
                .arg(script)
                .arg(&verb)
                .arg(dir)
                .status()
        })
        .await
        .unwrap()
        .unwrap();
        assert!(status.success(), "kube-apiserver.sh failed: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_api_server_restart() {
    let Some(env) = env("watch_survives_api_server_restart").await else {
        return;
    };
    let before = unique("before");
    create_node(&env.admin, &before, "192.0.2.41").await;
    policy_inputs::create_namespace(&env.admin, &before, "a").await;
    let mut changes = Box::pin(weft_kube::node_changes(env.weft.clone()));
    wait_for(&mut changes, Duration::from_secs(20), |c| {
        peers_have(c, &before)
    })
    .await;
    let mut snapshots = policy_inputs::follow(&env.weft);
    let has = |name: String| move |c: &weft_policy::Cluster| c.namespace_labels(&name).is_some();
    policy_inputs::wait_cluster(&mut snapshots, Duration::from_secs(20), has(before.clone())).await;

    kube_script(&env.kube_dir, "stop-apiserver").await;
    // Keep polling while the server is gone: errors must not end the stream.
    let quiet = tokio::time::timeout(Duration::from_secs(4), changes.next()).await;
    assert!(quiet.is_err(), "no change while the API server is down");
    kube_script(&env.kube_dir, "start-apiserver").await;

    let after = unique("after");
    create_node(&env.admin, &after, "192.0.2.42").await;
    policy_inputs::create_namespace(&env.admin, &after, "a").await;
    wait_for(&mut changes, Duration::from_secs(90), |c| {
        peers_have(c, &after)
    })
    .await;
    // The policy inputs resumed too (or relisted): the new namespace is in.
    policy_inputs::wait_cluster(&mut snapshots, Duration::from_secs(90), has(after.clone())).await;
    delete_node(&env.admin, &before).await;
    delete_node(&env.admin, &after).await;
}

mod policy_inputs {
    //! NetworkPolicies, Pods and Namespaces followed with the weft token,
    //! written as admin (the fixtures) as a user would.

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
    use kube::{Api, Client};
    use tokio::sync::watch;
    use weft_kube::Snapshot;
    use weft_policy::Cluster;

    fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    pub async fn create_namespace(admin: &Client, name: &str, team: &str) {
        let ns: Namespace = typed(serde_json::json!({
            "metadata": { "name": name, "labels": { "team": team } }
        }));
        let api: Api<Namespace> = Api::all(admin.clone());
        api.create(&PostParams::default(), &ns).await.unwrap();
    }

    /// A pod as the kubelet would report it: Running at `ip`.
    async fn create_pod(admin: &Client, ns: &str, name: &str, app: &str, ip: &str) {
        let pod: Pod = typed(serde_json::json!({
            "metadata": { "name": name, "labels": { "app": app } },
            "spec": { "containers": [{
                "name": "app", "image": "pause",
                "ports": [{ "name": "http", "containerPort": 8080 }]
            }] }
        }));
        let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
        api.create(&PostParams::default(), &pod).await.unwrap();
        set_pod_status(admin, ns, name, "Running", Some(ip)).await;
    }

    async fn set_pod_status(admin: &Client, ns: &str, name: &str, phase: &str, ip: Option<&str>) {
        let mut status = serde_json::json!({ "phase": phase });
        if let Some(ip) = ip {
            status["podIP"] = ip.into();
            status["podIPs"] = serde_json::json!([{ "ip": ip }]);
        }
        let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
        let patch = Patch::Merge(serde_json::json!({ "status": status }));
        api.patch_status(name, &PatchParams::default(), &patch)
            .await
            .unwrap();
    }

    /// Ingress to app=web from namespaces of team a, on the named port.
    async fn create_policy(admin: &Client, ns: &str, name: &str) {
        let np: NetworkPolicy = typed(serde_json::json!({
            "metadata": { "name": name },
            "spec": {
                "podSelector": { "matchLabels": { "app": "web" } },
                "ingress": [{
                    "from": [{ "namespaceSelector": { "matchLabels": { "team": "a" } } }],
                    "ports": [{ "port": "http" }]
                }]
            }
        }));
        let api: Api<NetworkPolicy> = Api::namespaced(admin.clone(), ns);
        api.create(&PostParams::default(), &np).await.unwrap();
    }

    async fn relabel<K>(api: Api<K>, name: &str, key: &str, value: &str)
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let patch = Patch::Merge(serde_json::json!({ "metadata": { "labels": { key: value } } }));
        api.patch(name, &PatchParams::default(), &patch)
            .await
            .unwrap();
    }

    /// The first published snapshot for which `want` holds, and how long
    /// it took.
    pub async fn wait_cluster(
        rx: &mut watch::Receiver<Snapshot>,
        limit: Duration,
        want: impl Fn(&Cluster) -> bool,
    ) -> (Arc<Cluster>, Duration) {
        let start = Instant::now();
        let found = tokio::time::timeout(limit, async {
            loop {
                if let Some(c) = rx.borrow_and_update().clone()
                    && want(&c)
                {
                    return c;
                }
                rx.changed().await.expect("publisher ended");
            }
        });
        let cluster = found.await.expect("expected snapshot within the limit");
        (cluster, start.elapsed())
    }

    /// Starts the publisher with `client`; it stops when `rx` is dropped.
    pub fn follow(client: &Client) -> watch::Receiver<Snapshot> {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(weft_kube::publish_cluster(client.clone(), tx));
        rx
    }

    /// The part of a snapshot about one namespace, as JSON for comparison.
    fn part(c: &Cluster, ns: &str) -> serde_json::Value {
        let namespaces: Vec<_> = c.namespaces.iter().filter(|n| n.name == ns).collect();
        let pods: Vec<_> = c.pods.iter().filter(|p| p.namespace == ns).collect();
        let policies: Vec<_> = c.policies.iter().filter(|p| p.namespace == ns).collect();
        serde_json::json!({ "namespaces": namespaces, "pods": pods, "policies": policies })
    }

    fn pod(ns: &str, name: &str, app: &str, ip: &str) -> serde_json::Value {
        serde_json::json!({
            "namespace": ns, "name": name, "labels": { "app": app }, "ip": ip,
            "host_network": false,
            "ports": [{ "name": "http", "port": 8080, "protocol": "Tcp" }]
        })
    }

    /// 1,000 running pods and 200 policies; then pod label changes, each
    /// timed from the API write to the snapshot that has it.
    pub async fn latency_with_1000_pods(env: &super::Env) {
        use futures_util::{StreamExt, stream};
        let ns = super::unique("lat");
        create_namespace(&env.admin, &ns, "a").await;
        let writes = (0..1000u32).map(|i| {
            let (admin, ns) = (env.admin.clone(), ns.clone());
            async move {
                let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
                create_pod(&admin, &ns, &format!("p{i}"), "web", &ip).await;
            }
        });
        stream::iter(writes)
            .buffer_unordered(8)
            .collect::<Vec<()>>()
            .await;
        for i in 0..200 {
            create_policy(&env.admin, &ns, &format!("np{i}")).await;
        }
        let mut rx = follow(&env.weft);
        let full = |c: &Cluster| {
            c.pods.iter().filter(|p| p.namespace == ns).count() == 1000
                && c.policies.iter().filter(|p| p.namespace == ns).count() == 200
        };
        let (_, took) = wait_cluster(&mut rx, Duration::from_secs(60), full).await;
        eprintln!("latency: first snapshot of 1000 pods, 200 policies after {took:?}");
        let pods: Api<Pod> = Api::namespaced(env.admin.clone(), &ns);
        let mut times = Vec::new();
        for i in 0..50 {
            let (name, value) = (format!("p{}", i * 7), format!("v{i}"));
            let start = Instant::now();
            relabel(pods.clone(), &name, "app", &value).await;
            wait_cluster(&mut rx, Duration::from_secs(20), |c| {
                c.pods.iter().any(|p| {
                    p.namespace == ns && p.name == name && p.labels.get("app") == Some(&value)
                })
            })
            .await;
            times.push(start.elapsed());
        }
        times.sort();
        let at = |q: usize| times[(times.len() * q / 100).min(times.len() - 1)];
        eprintln!(
            "latency: pod label change -> published snapshot over {} changes: p50 {:?} p99 {:?} max {:?}",
            times.len(),
            at(50),
            at(99),
            times[times.len() - 1]
        );
        let now = DeleteParams::default().grace_period(0);
        let deletes = (0..1000u32).map(|i| {
            let (pods, now) = (pods.clone(), now.clone());
            async move { pods.delete(&format!("p{i}"), &now).await.map(|_| ()) }
        });
        stream::iter(deletes)
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
    }

    pub async fn converges_and_follows_changes(env: &super::Env) {
        let ns = super::unique("pol");
        create_namespace(&env.admin, &ns, "a").await;
        create_pod(&env.admin, &ns, "web", "web", "10.99.0.5").await;
        create_pod(&env.admin, &ns, "db", "db", "10.99.0.6").await;
        create_policy(&env.admin, &ns, "web-from-a").await;

        let mut rx = follow(&env.weft);
        let policy = serde_json::json!({
            "namespace": ns, "name": "web-from-a",
            "pod_selector": { "match_labels": { "app": "web" }, "match_expressions": [] },
            // The API server defaults an omitted policyTypes.
            "policy_types": ["Ingress"],
            "ingress": [{
                "peers": [{ "Pods": {
                    "pod_selector": null,
                    "namespace_selector": { "match_labels": { "team": "a" }, "match_expressions": [] }
                } }],
                "ports": [{ "protocol": "Tcp", "port": { "Name": "http" }, "end_port": null }]
            }],
            "egress": null
        });
        let want = serde_json::json!({
            "namespaces": [{ "name": ns, "labels": { "team": "a" } }],
            "pods": [pod(&ns, "db", "db", "10.99.0.6"), pod(&ns, "web", "web", "10.99.0.5")],
            "policies": [policy],
        });
        let limit = Duration::from_secs(20);
        let (_, took) = wait_cluster(&mut rx, limit, |c| part(c, &ns) == want).await;
        eprintln!("policy inputs: first snapshot after {took:?}");

        // Each change, timed from the API write to the published snapshot.
        let namespaces: Api<Namespace> = Api::all(env.admin.clone());
        let pods: Api<Pod> = Api::namespaced(env.admin.clone(), &ns);
        let policies: Api<NetworkPolicy> = Api::namespaced(env.admin.clone(), &ns);
        let start = Instant::now();
        relabel(namespaces.clone(), &ns, "team", "b").await;
        wait_cluster(&mut rx, limit, |c| {
            c.namespace_labels(&ns)
                .and_then(|l| l.get("team"))
                .map(String::as_str)
                == Some("b")
        })
        .await;
        eprintln!(
            "policy inputs: namespace label -> snapshot {:?}",
            start.elapsed()
        );

        let start = Instant::now();
        relabel(pods.clone(), "db", "app", "web").await;
        wait_cluster(&mut rx, limit, |c| {
            c.pods
                .iter()
                .any(|p| p.namespace == ns && p.name == "db" && p.labels["app"] == "web")
        })
        .await;
        eprintln!("policy inputs: pod label -> snapshot {:?}", start.elapsed());

        let start = Instant::now();
        set_pod_status(&env.admin, &ns, "db", "Succeeded", None).await;
        wait_cluster(&mut rx, limit, |c| {
            !c.pods.iter().any(|p| p.namespace == ns && p.name == "db")
        })
        .await;
        eprintln!(
            "policy inputs: pod finished -> snapshot {:?}",
            start.elapsed()
        );

        let start = Instant::now();
        policies
            .delete("web-from-a", &DeleteParams::default())
            .await
            .unwrap();
        let (c, _) = wait_cluster(&mut rx, limit, |c| {
            !c.policies.iter().any(|p| p.namespace == ns)
        })
        .await;
        eprintln!(
            "policy inputs: policy deleted -> snapshot {:?}",
            start.elapsed()
        );
        assert_eq!(
            part(&c, &ns),
            serde_json::json!({
                "namespaces": [{ "name": ns, "labels": { "team": "b" } }],
                "pods": [pod(&ns, "web", "web", "10.99.0.5")],
                "policies": [],
            })
        );

        let now = DeleteParams::default().grace_period(0);
        for name in ["web", "db"] {
            pods.delete(name, &now).await.unwrap();
        }
        let (c, _) = wait_cluster(&mut rx, limit, |c| {
            !c.pods.iter().any(|p| p.namespace == ns)
        })
        .await;
        assert!(c.namespace_labels(&ns).is_some());
        // Without a namespace controller the namespace stays Terminating.
        let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_inputs_converge_and_follow_changes() {
    let Some(env) = env("policy_inputs_converge_and_follow_changes").await else {
        return;
    };
    policy_inputs::converges_and_follows_changes(&env).await;
}

/// A measurement, not a check: skipped unless WEFT_KUBE_BENCH=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_inputs_latency_with_1000_pods() {
    if std::env::var("WEFT_KUBE_BENCH").as_deref() != Ok("1") {
        eprintln!("policy_inputs_latency_with_1000_pods: skipped (set WEFT_KUBE_BENCH=1)");
        return;
    }
    let Some(env) = env("policy_inputs_latency_with_1000_pods").await else {
        return;
    };
    policy_inputs::latency_with_1000_pods(&env).await;
}
