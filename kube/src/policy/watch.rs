//! Following NetworkPolicies, Pods and Namespaces cluster-wide, and
//! publishing each new `weft_policy::Cluster` on a `tokio::sync::watch`.
//!
//! Memory: kube's reflector stores whole objects, and a Pod object is
//! several kilobytes (managedFields, status, every container's spec). The
//! watch keeps only the converted values instead (labels, address, ports),
//! and an update that changes none of them (status heartbeats, readiness)
//! publishes nothing.
//!
//! Nothing is published until all three kinds are listed: a partial view
//! (policies without the pods they select, pods without their namespace's
//! labels) would decide wrongly.

use std::collections::BTreeMap;
use std::future::ready;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace as KubeNamespace, Pod as KubePod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::watch;
use weft_policy::{Cluster, Namespace, Pod, Policy};

use super::{namespace_of, pod_of, policy_of};

/// How long a change waits for others of the same burst (a rollout, a
/// namespace relabel) before the snapshot is published; the longest any
/// change is held back.
pub const COALESCE: Duration = Duration::from_millis(50);

/// What the published channel holds: `None` until every kind is listed.
pub type Snapshot = Option<Arc<Cluster>>;

/// (namespace, name); namespaces have namespace "".
type Key = (String, String);

/// One watched object, converted. `None`: the object is there but stands
/// for nothing in the model (a terminated pod), the same as deleted.
#[derive(Debug)]
pub enum Seen<V> {
    Init,
    Put {
        key: Key,
        value: Option<V>,
        init: bool,
    },
    Gone(Key),
    InitDone,
}

/// The converted objects of one kind, as the watch last reported them.
/// A relist (after a watch could not resume) replaces them all, so objects
/// deleted while the API server was out of reach are dropped.
#[derive(Debug)]
pub struct Tracked<V> {
    items: BTreeMap<Key, V>,
    relist: Option<BTreeMap<Key, V>>,
    synced: bool,
}

impl<V> Default for Tracked<V> {
    fn default() -> Self {
        Tracked {
            items: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<V: PartialEq> Tracked<V> {
    /// Feeds one event; true when the converted set changed.
    pub fn apply(&mut self, seen: Seen<V>) -> bool {
        match seen {
            Seen::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Seen::Put { key, value, init } => match (&mut self.relist, init) {
                (Some(relist), true) => {
                    relist.extend(value.map(|v| (key, v)));
                    false
                }
                _ => self.put(key, value),
            },
            Seen::Gone(key) => self.items.remove(&key).is_some(),
            Seen::InitDone => {
                let fresh = self.relist.take().unwrap_or_default();
                let changed = !self.synced || fresh != self.items;
                self.items = fresh;
                self.synced = true;
                changed
            }
        }
    }

    fn put(&mut self, key: Key, value: Option<V>) -> bool {
        match value {
            Some(v) if self.items.get(&key) == Some(&v) => false,
            Some(v) => {
                self.items.insert(key, v);
                true
            }
            None => self.items.remove(&key).is_some(),
        }
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.items.values()
    }
}

/// Everything the watch knows; one owner (the publishing task).
#[derive(Debug, Default)]
pub struct ClusterState {
    pub namespaces: Tracked<Namespace>,
    pub pods: Tracked<Pod>,
    pub policies: Tracked<Policy>,
}

/// One event of any of the three watches.
#[derive(Debug)]
pub enum Change {
    Namespace(Seen<Namespace>),
    Pod(Seen<Pod>),
    Policy(Seen<Policy>),
}

impl ClusterState {
    /// Feeds one event; true when the model changed.
    pub fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Namespace(seen) => self.namespaces.apply(seen),
            Change::Pod(seen) => self.pods.apply(seen),
            Change::Policy(seen) => self.policies.apply(seen),
        }
    }

    pub fn synced(&self) -> bool {
        self.namespaces.synced() && self.pods.synced() && self.policies.synced()
    }

    /// The model, sorted by (namespace, name): equal states give equal
    /// snapshots.
    pub fn snapshot(&self) -> Cluster {
        Cluster {
            namespaces: self.namespaces.values().cloned().collect(),
            pods: self.pods.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
        }
    }
}

/// Follows the three kinds and publishes a snapshot after every change
/// that reaches the model, at most `COALESCE` after it (verbs: `list`,
/// `watch` on networkpolicies, pods and namespaces, cluster-wide).
///
/// Runs until every receiver of `out` is dropped. API errors never end it:
/// each watch logs them, backs off (0.8 s doubling to 30 s, with jitter)
/// and resumes or relists; the last snapshot stays published meanwhile.
pub async fn publish_cluster(client: Client, out: watch::Sender<Snapshot>) {
    let mut changes = Box::pin(changes(client));
    let mut state = ClusterState::default();
    loop {
        let next = tokio::select! {
            next = changes.next() => next,
            () = out.closed() => return,
        };
        let Some(first) = next else { return };
        let mut changed = state.apply(first);
        if changed {
            // Coalesce the rest of the burst, never holding the first longer.
            let deadline = tokio::time::Instant::now() + COALESCE;
            while let Ok(Some(change)) = tokio::time::timeout_at(deadline, changes.next()).await {
                changed |= state.apply(change);
            }
        }
        if changed && state.synced() {
            let snapshot = state.snapshot();
            tracing::debug!(
                namespaces = snapshot.namespaces.len(),
                pods = snapshot.pods.len(),
                policies = snapshot.policies.len(),
                "policy inputs changed"
            );
            if out.send(Some(Arc::new(snapshot))).is_err() {
                return;
            }
        }
    }
}

/// The three watches as one stream of converted events.
fn changes(client: Client) -> impl Stream<Item = Change> + Send + 'static {
    let namespaces =
        follow(Api::<KubeNamespace>::all(client.clone()), namespace_of).map(Change::Namespace);
    let pods = follow(Api::<KubePod>::all(client.clone()), pod_of).map(Change::Pod);
    let policies = follow(Api::<NetworkPolicy>::all(client), converted_policy).map(Change::Policy);
    stream::select(stream::select(namespaces, pods), policies)
}

/// Logs what makes a policy fail closed, each time its object changes.
fn converted_policy(np: &NetworkPolicy) -> Option<Policy> {
    let converted = policy_of(np)?;
    let problems = converted.policy.problems();
    if !converted.unreadable.is_empty() || !problems.is_empty() {
        let p = &converted.policy;
        tracing::warn!(
            policy = %format!("{}/{}", p.namespace, p.name),
            unreadable = ?converted.unreadable,
            problems = %problems.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "),
            "NetworkPolicy cannot be read in full: it isolates the pods it selects and allows nothing"
        );
    }
    Some(converted.policy)
}

/// One kind's watch, converted; errors are logged and retried with backoff.
fn follow<K, V>(api: Api<K>, convert: fn(&K) -> Option<V>) -> impl Stream<Item = Seen<V>> + Send
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + 'static,
    K: k8s_openapi::serde::de::DeserializeOwned,
    V: Send + 'static,
{
    let kind = K::kind(&()).to_string();
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| {
            ready(match event {
                Ok(event) => seen(event, convert),
                Err(e) => {
                    tracing::warn!(error = %e, kind = %kind, "watch failed; retrying with backoff");
                    None
                }
            })
        })
}

fn seen<K: Resource, V>(event: watcher::Event<K>, convert: fn(&K) -> Option<V>) -> Option<Seen<V>> {
    let put = |obj: K, init| {
        key(&obj).map(|key| Seen::Put {
            key,
            value: convert(&obj),
            init,
        })
    };
    match event {
        watcher::Event::Init => Some(Seen::Init),
        watcher::Event::InitApply(obj) => put(obj, true),
        watcher::Event::InitDone => Some(Seen::InitDone),
        watcher::Event::Apply(obj) => put(obj, false),
        watcher::Event::Delete(obj) => key(&obj).map(Seen::Gone),
    }
}

fn key<K: Resource>(obj: &K) -> Option<Key> {
    let meta = obj.meta();
    let name = meta.name.clone().filter(|n| !n.is_empty())?;
    Some((meta.namespace.clone().unwrap_or_default(), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, team: &str) -> Namespace {
        Namespace {
            name: name.into(),
            labels: [("team".to_string(), team.to_string())].into(),
        }
    }

    fn put(name: &str, team: &str, init: bool) -> Seen<Namespace> {
        Seen::Put {
            key: (String::new(), name.into()),
            value: Some(ns(name, team)),
            init,
        }
    }

    fn list(t: &mut Tracked<Namespace>, items: &[(&str, &str)]) -> bool {
        let mut changed = t.apply(Seen::Init);
        for (name, team) in items {
            changed |= t.apply(put(name, team, true));
        }
        changed | t.apply(Seen::InitDone)
    }

    fn names(t: &Tracked<Namespace>) -> Vec<&str> {
        t.values().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn relist_replaces_and_drops_what_vanished_meanwhile() {
        let mut t = Tracked::default();
        assert!(list(&mut t, &[("b", "x"), ("a", "x")]));
        assert_eq!(names(&t), ["a", "b"]);
        assert!(list(&mut t, &[("b", "x")]));
        assert_eq!(names(&t), ["b"]);
        // The same list again is no change.
        assert!(!list(&mut t, &[("b", "x")]));
    }

    #[test]
    fn the_first_list_is_a_change_even_when_empty() {
        let mut t: Tracked<Namespace> = Tracked::default();
        assert!(!t.synced());
        assert!(list(&mut t, &[]));
        assert!(t.synced());
    }

    #[test]
    fn only_model_changes_count() {
        let mut t = Tracked::default();
        list(&mut t, &[("a", "x")]);
        assert!(!t.apply(put("a", "x", false)), "same converted value");
        assert!(t.apply(put("a", "y", false)));
        assert!(!t.apply(Seen::Gone((String::new(), "nope".into()))));
        assert!(t.apply(Seen::Gone((String::new(), "a".into()))));
        assert!(names(&t).is_empty());
    }

    #[test]
    fn an_object_that_stands_for_nothing_is_removed() {
        let mut t = Tracked::default();
        list(&mut t, &[("a", "x")]);
        let gone = Seen::Put {
            key: (String::new(), "a".into()),
            value: None,
            init: false,
        };
        assert!(t.apply(gone));
        assert!(names(&t).is_empty());
    }

    #[test]
    fn snapshot_waits_for_every_kind_and_is_sorted() {
        let mut s = ClusterState::default();
        s.apply(Change::Namespace(Seen::Init));
        s.apply(Change::Namespace(put("z", "x", true)));
        s.apply(Change::Namespace(put("m", "x", true)));
        s.apply(Change::Namespace(Seen::InitDone));
        s.apply(Change::Pod(Seen::Init));
        s.apply(Change::Pod(Seen::InitDone));
        assert!(!s.synced(), "policies not listed yet");
        s.apply(Change::Policy(Seen::Init));
        s.apply(Change::Policy(Seen::InitDone));
        assert!(s.synced());
        let snap = s.snapshot();
        let got: Vec<&str> = snap.namespaces.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(got, ["m", "z"]);
    }
}
