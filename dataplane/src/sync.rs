//! Keeps the kernel in step with the router: a thread of its own (netlink
//! calls block) follows the router's published [`View`] and the fastdp
//! probe's verdicts, turns them into a [`Desired`] state and applies it,
//! and deletes pods' devices. It is the only writer of the kernel's weft
//! state and of the [`DataplaneState`] the status pages read. What it
//! does with each view is a [`Follower`]'s, which the simulator runs
//! without the thread.

use crate::desired::{Owners, Setup, desired};
use crate::probe::Prober;
use crate::status::DataplaneState;
use crate::{Dataplane, DataplaneError, Desired, Overlay, PodRoute, underlay};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use weft_core::{PeerName, View};

/// How often the kernel is checked even when nothing changed, to repair
/// what others changed under it.
pub const RESYNC: Duration = Duration::from_secs(30);

/// What the kernel thread follows.
pub struct Follow {
    /// The router's views, as the driver loop publishes them.
    pub views: watch::Receiver<Arc<View>>,
    pub setup: Setup,
    /// fastdp's per-peer verdicts, when fastdp runs.
    pub prober: Option<Arc<Prober>>,
}

/// Handles on the kernel thread.
#[derive(Clone)]
pub struct KernelSync {
    deletes: mpsc::UnboundedSender<String>,
    /// The pods' gateway as the kernel's bridge holds it: set once a
    /// desired state with that bridge is applied, so pods are wired only to
    /// a bridge that exists.
    bridge_gateway: watch::Receiver<Option<Ipv4Addr>>,
    status: watch::Receiver<DataplaneState>,
}

/// Why the kernel thread woke.
enum Wake {
    Delete(String),
    Changed,
    Resync,
    Stop,
}

impl KernelSync {
    /// Starts the thread. A VXLAN device that cannot be set up makes it
    /// fall back to the bridge alone, with the reason in the status.
    pub fn start(
        dataplane: Box<dyn Dataplane + Send>,
        status: DataplaneState,
        follow: Follow,
    ) -> KernelSync {
        let (deletes, deletes_rx) = mpsc::unbounded_channel();
        let (bridge_tx, bridge_gateway) = watch::channel(None);
        let follower = Follower::new(dataplane, follow.setup, status.clone());
        let (status_tx, status) = watch::channel(status);
        let thread = Thread {
            follower,
            views: follow.views,
            prober: follow.prober,
            deletes: deletes_rx,
            bridge: bridge_tx,
            status: status_tx,
            resync_at: tokio::time::Instant::now() + RESYNC,
        };
        std::thread::Builder::new()
            .name("weft-kernel".into())
            .spawn(move || thread.run())
            .expect("spawn the kernel dataplane thread");
        KernelSync {
            deletes,
            bridge_gateway,
            status,
        }
    }

    /// Whether the kernel's bridge holds `gateway`.
    pub fn bridge_holds(&self, gateway: Ipv4Addr) -> bool {
        *self.bridge_gateway.borrow() == Some(gateway)
    }

    /// Returns once the kernel's bridge holds the gateway `gateway()` names
    /// (asked again after every change the kernel thread applies).
    pub async fn bridge_ready(&self, gateway: impl Fn() -> Option<Ipv4Addr>) {
        let mut applied = self.bridge_gateway.clone();
        loop {
            if gateway().is_some_and(|g| *applied.borrow_and_update() == Some(g)) {
                return;
            }
            if applied.changed().await.is_err() {
                // The kernel thread is gone: nothing will change any more.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Deletes a pod's host-side veth in the background.
    pub fn delete_device(&self, name: String) -> bool {
        self.deletes.send(name).is_ok()
    }

    /// What the kernel thread last did.
    pub fn status(&self) -> watch::Receiver<DataplaneState> {
        self.status.clone()
    }
}

struct Thread {
    follower: Follower<Box<dyn Dataplane + Send>>,
    views: watch::Receiver<Arc<View>>,
    prober: Option<Arc<Prober>>,
    deletes: mpsc::UnboundedReceiver<String>,
    bridge: watch::Sender<Option<Ipv4Addr>>,
    status: watch::Sender<DataplaneState>,
    /// When the next resync is due, however often views wake the thread.
    resync_at: tokio::time::Instant,
}

impl Thread {
    fn run(mut self) {
        let waiting = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime to wait on");
        // The first state is wanted at once.
        let mut wake = Wake::Changed;
        loop {
            match wake {
                Wake::Stop => return,
                Wake::Delete(name) => self.follower.delete_device(&name),
                Wake::Changed => self.follow(false),
                Wake::Resync => {
                    self.resync_at = tokio::time::Instant::now() + RESYNC;
                    self.follow(true);
                }
            }
            wake = waiting.block_on(self.next());
        }
    }

    async fn next(&mut self) -> Wake {
        let prober = self.prober.clone();
        let path_changed = async {
            match &prober {
                Some(prober) => prober.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            name = self.deletes.recv() => name.map_or(Wake::Stop, Wake::Delete),
            changed = self.views.changed() => match changed {
                Ok(()) => Wake::Changed,
                Err(_) => Wake::Stop,
            },
            () = path_changed => Wake::Changed,
            () = tokio::time::sleep_until(self.resync_at) => Wake::Resync,
        }
    }

    /// Follows the newest view and the probe's verdicts, and tells the
    /// status pages and the CNI path what the kernel took.
    fn follow(&mut self, resync: bool) {
        let view = self.views.borrow_and_update().clone();
        let sleeved: BTreeSet<PeerName> = self
            .prober
            .as_ref()
            .map(|p| p.sleeved())
            .unwrap_or_default();
        let outcome = self.follower.follow(&view, sleeved, underlay_dev, resync);
        if outcome == Outcome::Unchanged {
            return;
        }
        self.status.send_replace(self.follower.status().clone());
        if outcome == Outcome::Applied {
            let applied = self.follower.applied();
            let gateway = applied
                .and_then(|a| a.bridge.as_ref())
                .map(|b| b.gateway.addr());
            self.bridge.send_replace(gateway);
        }
    }
}

/// What one [`Follower::follow`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The state asked for is the one applied: nothing was done.
    Unchanged,
    /// A new state was applied.
    Applied,
    /// Applying failed (see the status); tried again at the next follow.
    Failed,
}

/// Follows the router's views into a [`Dataplane`]: the desired state of
/// each view, applied when it changed. The agent's kernel thread runs one
/// over the kernel; the simulator runs one per node, synchronously, over a
/// [`crate::MemoryDataplane`].
pub struct Follower<D> {
    dataplane: D,
    setup: Setup,
    status: DataplaneState,
    /// The last state the dataplane took.
    applied: Option<Desired>,
    /// What that state was computed from.
    followed: Option<(Arc<View>, BTreeSet<PeerName>)>,
    /// Where the owners of remote prefixes were last seen, from the views
    /// followed.
    owners: Owners,
}

impl<D: Dataplane> Follower<D> {
    /// A follower that has applied nothing yet.
    pub fn new(dataplane: D, setup: Setup, status: DataplaneState) -> Follower<D> {
        Follower {
            dataplane,
            setup,
            status,
            applied: None,
            followed: None,
            owners: Owners::default(),
        }
    }

    /// Applies the state `view` asks for, with the `sleeved` peers' routes
    /// in the sleeve; `underlay_dev` names the interface VXLAN sends
    /// through, asked only when a new state is computed. An unchanged
    /// state is not reconciled again unless `resync`; a failed one is
    /// tried again at the next follow.
    pub fn follow(
        &mut self,
        view: &Arc<View>,
        sleeved: BTreeSet<PeerName>,
        underlay_dev: impl FnOnce(&View) -> Option<String>,
        resync: bool,
    ) -> Outcome {
        // Most views differ from the last only in when peers were heard.
        let same_input = self
            .followed
            .as_ref()
            .is_some_and(|(v, s)| v.same_routing(view) && *s == sleeved);
        if same_input && !resync && self.applied.is_some() {
            return Outcome::Unchanged;
        }
        self.owners.learn(view);
        let next = desired(
            view,
            &self.setup,
            underlay_dev(view),
            &sleeved,
            &self.owners,
        );
        if self.applied.as_ref() == Some(&next) {
            if resync {
                // A node setting others may change back.
                self.dataplane.tune(&next);
            }
            // The same state from other inputs: the next view like this
            // one need not be computed again.
            self.followed = Some((view.clone(), sleeved));
            return Outcome::Unchanged;
        }
        if !apply(&mut self.dataplane, &next, &mut self.status) {
            return Outcome::Failed;
        }
        self.applied = Some(next);
        self.followed = Some((view.clone(), sleeved));
        Outcome::Applied
    }

    /// Deletes a device (a pod's veth); a failure is logged.
    pub fn delete_device(&mut self, name: &str) {
        if let Err(e) = self.dataplane.delete_device(name) {
            tracing::warn!("{e}");
        }
    }

    /// What the follower last did, for the status pages.
    pub fn status(&self) -> &DataplaneState {
        &self.status
    }

    /// The last desired state the dataplane took.
    pub fn applied(&self) -> Option<&Desired> {
        self.applied.as_ref()
    }

    /// The dataplane itself, to read what it holds.
    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }
}

/// The interface VXLAN sends through: the one holding our address.
fn underlay_dev(view: &View) -> Option<String> {
    match view.address.ip() {
        IpAddr::V4(ip) => underlay::holding(ip).map(|i| i.name),
        IpAddr::V6(_) => None,
    }
}

/// Applies `desired`; true when the kernel now holds its bridge.
fn apply(dataplane: &mut dyn Dataplane, desired: &Desired, state: &mut DataplaneState) -> bool {
    let want = match state.fallback.is_some() {
        true => without_vxlan(desired),
        false => desired.clone(),
    };
    match dataplane.reconcile(&want) {
        Ok(()) => {
            state.kernel_error = None;
            dataplane.tune(&want);
            state.in_use = in_use(&want).into();
            true
        }
        Err(e @ DataplaneError::Vxlan { .. }) => {
            let without_vxlan = without_vxlan(desired);
            state.fallback = Some(e.to_string());
            state.in_use = in_use(&without_vxlan).into();
            tracing::warn!("fastdp unavailable, using {}: {e}", state.in_use);
            match dataplane.reconcile(&without_vxlan) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("kernel dataplane: {e}");
                    state.kernel_error = Some(e.to_string());
                    false
                }
            }
        }
        Err(e) => {
            tracing::error!("kernel dataplane: {e}");
            state.kernel_error = Some(e.to_string());
            false
        }
    }
}

/// `desired` with the sleeve carrying everything (node-wide fallback).
fn without_vxlan(desired: &Desired) -> Desired {
    Desired {
        vxlan: None,
        peers: Vec::new(),
        routes: desired
            .routes
            .iter()
            .map(|r| PodRoute {
                device: Overlay::Sleeve,
                ..*r
            })
            .collect(),
        ..desired.clone()
    }
}

fn in_use(d: &Desired) -> &'static str {
    match (&d.vxlan, &d.sleeve) {
        (Some(_), _) => Overlay::Fastdp.name(),
        (None, Some(_)) => Overlay::Sleeve.name(),
        (None, None) => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::tests::{FASTDP, desired_of, three_routers};
    use crate::{BridgeSpec, MemoryDataplane, VxlanSpec};

    fn state() -> DataplaneState {
        DataplaneState::new("fastdp")
    }

    #[test]
    fn a_vxlan_failure_falls_back_to_the_bridge_and_says_why() {
        let mut memory = MemoryDataplane::new();
        memory.fail_vxlan(Some("Operation not supported".into()));
        let mut s = state();
        let desired = Desired {
            bridge: Some(BridgeSpec {
                name: "weft".into(),
                gateway: "10.32.0.1/12".parse().unwrap(),
                mtu: 1450,
            }),
            ..vxlan_only()
        };
        apply(&mut memory, &desired, &mut s);
        assert_eq!(s.in_use, "none");
        assert!(
            s.fallback
                .as_deref()
                .unwrap()
                .contains("Operation not supported"),
            "{s:?}"
        );
        assert_eq!(memory.state().bridge, desired.bridge);
        assert_eq!(memory.state().vxlan, None);
    }

    /// A VXLAN device and nothing else.
    fn vxlan_only() -> Desired {
        Desired {
            vxlan: Some(VxlanSpec::new(
                "192.168.1.11".parse().unwrap(),
                1450,
                [2; 6],
            )),
            ..Desired::default()
        }
    }

    /// Fails its first reconcile, as a kernel busy with another change may.
    struct FailsOnce(MemoryDataplane, bool);

    impl Dataplane for FailsOnce {
        fn reconcile(&mut self, desired: &Desired) -> Result<(), DataplaneError> {
            if std::mem::replace(&mut self.1, false) {
                return Err(DataplaneError::Injected("busy".into()));
            }
            self.0.reconcile(desired)
        }
        fn teardown(&mut self) -> Result<(), DataplaneError> {
            self.0.teardown()
        }
        fn delete_device(&mut self, name: &str) -> Result<(), DataplaneError> {
            self.0.delete_device(name)
        }
    }

    /// A view with space (the gateway) and nothing else.
    fn view_with_gateway(gateway: Ipv4Addr) -> View {
        View {
            me: PeerName(1),
            epoch: 0,
            address: "192.168.1.11:6783".parse().unwrap(),
            range: "10.32.0.0/12".parse().unwrap(),
            gateway: Some(gateway),
            forwarding: Default::default(),
            neighbours: Vec::new(),
            connected: Default::default(),
            heard: Default::default(),
        }
    }

    /// The CNI plugin waits for the bridge to hold the gateway: a failed
    /// apply is retried at the next wake, and only a bridge the kernel took
    /// counts.
    #[test]
    fn a_failed_apply_is_retried_and_the_bridge_counts_once_applied() {
        let gateway = Ipv4Addr::new(10, 32, 0, 1);
        let (views_tx, views) = watch::channel(Arc::new(view_with_gateway(gateway)));
        let setup = Setup {
            bridge: "weft".into(),
            mtu: 1450,
            overlay: Overlay::Sleeve,
            sleeve_fallback: false,
        };
        let follow = Follow {
            views,
            setup,
            prober: None,
        };
        let kernel = KernelSync::start(
            Box::new(FailsOnce(MemoryDataplane::new(), true)),
            state(),
            follow,
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut status = kernel.status();
        rt.block_on(async {
            // Once the failure is recorded, the bridge does not count.
            while status.borrow_and_update().kernel_error.is_none() {
                status.changed().await.unwrap();
            }
            assert!(!kernel.bridge_holds(gateway));
            // The same view again wakes the thread, which tries again.
            views_tx.send_modify(|_| {});
            let retried = Duration::from_secs(60);
            tokio::time::timeout(retried, kernel.bridge_ready(|| Some(gateway)))
                .await
                .expect("the same state, woken again, is applied");
        });
        assert!(kernel.bridge_holds(gateway));
        assert_eq!(kernel.status().borrow().kernel_error, None);
    }

    /// The follower without the thread, as the simulator runs it: a failed
    /// apply is tried again at the next follow, a view that differs only
    /// in when peers were heard is not applied again (nor is the underlay
    /// asked for), and a resync of the same state reconciles nothing.
    #[test]
    fn a_follower_applies_each_new_state_once() {
        let gateway = Ipv4Addr::new(10, 32, 0, 1);
        let setup = Setup {
            bridge: "weft".into(),
            mtu: 1450,
            overlay: Overlay::Sleeve,
            sleeve_fallback: false,
        };
        let failing = FailsOnce(MemoryDataplane::new(), true);
        let mut follower = Follower::new(failing, setup, state());
        let view = Arc::new(view_with_gateway(gateway));
        let follow = |f: &mut Follower<FailsOnce>, view: &Arc<View>, resync| {
            f.follow(view, BTreeSet::new(), |_| None, resync)
        };
        assert_eq!(follow(&mut follower, &view, false), Outcome::Failed);
        assert!(follower.status().kernel_error.is_some());
        assert_eq!(follower.applied(), None);
        assert_eq!(follow(&mut follower, &view, false), Outcome::Applied);
        assert_eq!(follower.status().kernel_error, None);
        let bridge = follower.dataplane().0.state().bridge.clone();
        assert_eq!(bridge.map(|b| b.gateway.addr()), Some(gateway));
        let mut heard = (*view).clone();
        heard
            .heard
            .insert(PeerName(2), weft_core::Time::from_millis(5));
        let unasked = |_: &View| -> Option<String> { panic!("the underlay is not asked for") };
        let outcome = follower.follow(&Arc::new(heard), BTreeSet::new(), unasked, false);
        assert_eq!(outcome, Outcome::Unchanged);
        assert_eq!(follow(&mut follower, &view, true), Outcome::Unchanged);
        assert_eq!(follower.dataplane().0.reconciles(), 1);
    }

    #[test]
    fn a_working_vxlan_is_reported_as_fastdp() {
        let mut memory = MemoryDataplane::new();
        let mut s = state();
        let desired = vxlan_only();
        apply(&mut memory, &desired, &mut s);
        assert_eq!(s.in_use, "fastdp");
        assert_eq!(memory.state().vxlan, desired.vxlan);
    }

    #[test]
    fn a_node_wide_fallback_puts_every_route_into_the_sleeve() {
        let routers = three_routers(10);
        let d = desired_of(&routers[0], FASTDP, &BTreeSet::new());
        let mut memory = MemoryDataplane::new();
        memory.fail_vxlan(Some("Operation not supported".into()));
        let mut s = state();
        apply(&mut memory, &d, &mut s);
        assert_eq!(s.in_use, "sleeve");
        assert_eq!(memory.state().routes.len(), 2);
        assert!(
            memory
                .state()
                .routes
                .iter()
                .all(|r| r.device == Overlay::Sleeve)
        );
    }
}
