//! IPAM across several peers, driven by the in-crate harness.

use super::space::GATEWAY_ID;
use super::{Allocation, IpamError, IpamEvent, IpamInit, IpamMode, PendingReason};
use crate::forward::Forward;
use crate::harness::Net;
use crate::router::Event;
use crate::{Config, Router, Time};
use ipnet::Ipv4Net;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn plain(_: usize, _: &mut Config) {}

fn allocate(net: &mut Net, i: usize, container: &str) -> Result<Allocation, IpamError> {
    net.call(i, |r, now| r.allocate(now, container))
        .expect("node is running")
}

fn ready(net: &mut Net, i: usize, container: &str) -> Ipv4Addr {
    match allocate(net, i, container) {
        Ok(Allocation::Ready(a)) => a,
        other => panic!("node {i}, {container}: {other:?}"),
    }
}

/// Every address any running node has handed out, with who holds it.
fn all_allocations(net: &Net) -> Vec<(Ipv4Addr, usize, String)> {
    net.running()
        .flat_map(|(i, r)| {
            r.ipam()
                .allocations()
                .iter()
                .map(move |(c, a)| (a, i, c.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The two invariants that must hold at every moment.
fn assert_unique(net: &Net) {
    let allocations = all_allocations(net);
    let distinct: BTreeSet<Ipv4Addr> = allocations.iter().map(|(a, _, _)| *a).collect();
    assert_eq!(
        distinct.len(),
        allocations.len(),
        "an address is held twice: {allocations:?}"
    );
    let owned: Vec<(usize, Ipv4Net)> = net
        .running()
        .flat_map(|(i, r)| r.ipam().own_blocks().into_iter().map(move |b| (i, b)))
        .collect();
    for (x, (i, a)) in owned.iter().enumerate() {
        for (j, b) in &owned[x + 1..] {
            assert!(
                i == j || !(a.contains(b) || b.contains(a)),
                "node {i} owns {a} and node {j} owns {b}"
            );
        }
    }
}

fn ring_summaries(net: &Net) -> BTreeSet<u64> {
    net.running()
        .map(|(_, r)| r.ipam().ring().summary())
        .collect()
}

#[test]
fn three_peers_seed_one_ring_and_every_pod_gets_a_unique_address() {
    let mut net = Net::new(3, 21, plain);
    net.run_for(secs(10));
    assert_eq!(ring_summaries(&net).len(), 1, "one ring everywhere");
    for (_, r) in net.running() {
        assert!(r.ipam().ring().is_seeded());
        assert!(
            r.gateway().is_some(),
            "{} has a gateway",
            r.config().nickname
        );
    }
    for i in 0..3 {
        for p in 0..5 {
            let _ = allocate(&mut net, i, &format!("pod-{i}-{p}"));
        }
    }
    net.run_for(secs(10));
    let allocations = all_allocations(&net);
    assert_eq!(
        allocations.len(),
        3 * 6,
        "5 pods and a gateway per node: {allocations:?}"
    );
    assert_unique(&net);
    // Space is a few aligned prefixes per peer.
    for (_, r) in net.running() {
        let blocks = r.ipam().own_blocks();
        assert!(!blocks.is_empty() && blocks.len() <= 4, "{blocks:?}");
    }
}

#[test]
fn a_seeded_ring_is_shared_out_in_one_block_per_peer() {
    // Twenty peers start together: the first owner gives every other peer
    // an equal block in one step (as Weave divides the range among the
    // peers that seed it), not halves passed on in rounds of doubling, and
    // no peer is given space twice on an announcement older than a
    // donation.
    let mut net = Net::new(20, 23, plain);
    net.run_for(secs(15));
    assert_eq!(ring_summaries(&net).len(), 1, "one ring everywhere");
    let first_owner = net
        .running()
        .find_map(|(_, r)| r.ipam().ring().seed())
        .expect("seeded")
        .first_owner;
    let mut sizes = BTreeSet::new();
    for (i, r) in net.running().filter(|(_, r)| r.name() != first_owner) {
        let blocks = r.ipam().own_blocks();
        assert_eq!(blocks.len(), 1, "node {i} owns {blocks:?}");
        sizes.insert(blocks[0].prefix_len());
        assert!(r.gateway().is_some(), "node {i} has a gateway");
    }
    assert_eq!(sizes.len(), 1, "unequal shares: /{sizes:?}");
    assert_unique(&net);
}

#[test]
fn the_first_owner_splits_the_ring_as_soon_as_it_holds_it() {
    // The first owner has no other donor to wait for: it splits in the
    // step it seeds the ring or adopts it (the ring may reach it from a
    // peer that saw the decision first), not after its ring news has
    // spread, so peers do not announce the ring and then, a round of
    // gossip later, their block.
    let mut net = Net::new(20, 25, plain);
    let end = net.now + secs(15);
    let mut whole_since = None;
    let mut split = false;
    while net.now < end && !split {
        net.run_for(Duration::from_millis(10));
        for (_, r) in net.running() {
            let Some(seed) = r.ipam().ring().seed() else {
                continue;
            };
            if seed.first_owner != r.name() {
                continue;
            }
            if r.ipam().own_blocks() == vec![r.ipam().ring().universe()] {
                whole_since.get_or_insert(net.now);
            } else {
                split = true;
            }
        }
    }
    assert!(split, "the ring was split");
    // At most one housekeeping run (50 ms at this size) after adopting it.
    let held = whole_since.map_or(Duration::ZERO, |t| net.now.saturating_since(t));
    assert!(
        held <= Duration::from_millis(100),
        "held the whole range for {held:?}"
    );
    assert_unique(&net);
}

#[test]
fn peers_announce_the_ring_and_their_block_together() {
    // The first owner splits the ring among all the peers it knows, so a
    // peer that gets the ring from elsewhere (or sees the seeding decided)
    // waits for its block instead of announcing "a ring, no space" first:
    // at 1,000 nodes that announcement cost every peer a thousand fetches.
    let mut net = Net::new(20, 26, plain);
    let end = net.now + secs(15);
    while net.now < end {
        net.run_for(Duration::from_millis(10));
        for (i, r) in net.running() {
            let own = &r.topology().get(r.name()).expect("own entry").ipam;
            assert!(
                own.ring.is_none() || own.owned > 0,
                "node {i} announced a ring without space: {own:?}"
            );
        }
    }
    for (i, r) in net.running() {
        assert!(r.ipam().free() > 0, "node {i} got no block");
    }
    assert_unique(&net);
}

#[test]
fn a_peer_left_out_of_the_split_asks_for_space_at_once() {
    // Node 3 is cut off while nodes 0, 1 and 2 seed the ring and split it
    // among them. When it gets the ring, no block of its own is coming
    // (the first owner has shared out its space): it asks at once.
    let mut net = Net::new(4, 27, plain);
    net.partition(&[&[0, 1, 2], &[3]]);
    net.run_for(secs(10));
    // The premise: the first owner kept no more than half (with another
    // split, the first owner still shares out space to whoever shows up
    // without any, and a peer does well to wait for it).
    let ring = net.router(0).ipam().ring();
    let first = ring.seed().expect("nodes 0 to 2 seeded").first_owner;
    let universe = u64::from(!u32::from(ring.universe().netmask())) + 1;
    let kept: u64 = ring
        .blocks_of(first)
        .iter()
        .map(|b| u64::from(!u32::from(b.netmask())) + 1)
        .sum();
    assert!(
        kept <= universe / 2,
        "first owner kept {kept} of {universe}"
    );
    net.heal();
    let end = net.now + secs(20);
    while net.now < end && net.router(3).ipam().free() == 0 {
        net.run_for(Duration::from_millis(10));
        assert!(!net.router(3).ipam().announcement_waits());
    }
    assert!(net.router(3).ipam().free() > 0, "node 3 got space");
    assert_unique(&net);
}

#[test]
fn a_peer_waits_for_its_block_from_the_first_owner_for_a_while_only() {
    use super::ring::{Ring, Seed};
    use super::{Ipam, RingUpdate};
    let range: Ipv4Net = "10.32.0.0/16".parse().unwrap();
    let seed = Seed {
        id: 1,
        first_owner: crate::PeerName(1),
    };
    let unsplit = RingUpdate {
        universe: range,
        seed: Some(seed),
        blocks: Ring::seeded(range, seed).blocks().collect(),
        tombstones: Vec::new(),
    };
    let mode = IpamMode::Ring(IpamInit::Consensus(Some(3)));
    let mut ipam = Ipam::new(crate::PeerName(2), range, mode, 3, None);
    let mut rng = crate::random::Random::from_seed([9; 32]);
    let (peers, at) = (BTreeMap::new(), |ms| Time::ZERO + Duration::from_millis(ms));
    ipam.merge_ring(at(0), crate::PeerName(1), &unsplit)
        .expect("a compatible ring");
    // The first owner holds it all: our block is on its way.
    ipam.step(at(100), &peers, 2, &mut rng);
    assert!(ipam.announcement_waits());
    assert!(ipam.needs_timer(), "the wait ends on a timer");
    ipam.step(at(1_900), &peers, 2, &mut rng);
    assert!(ipam.announcement_waits());
    // No block came: announce that we want space.
    ipam.step(at(2_000), &peers, 2, &mut rng);
    assert!(!ipam.announcement_waits());
    assert!(ipam.info().wants_space, "{:?}", ipam.info());
}

#[test]
fn a_settled_ring_needs_no_timer_and_a_pending_pod_does() {
    let mut net = Net::new(3, 24, |_, c| {
        c.ipalloc_range = "10.9.0.0/26".parse().unwrap();
    });
    net.run_for(secs(15));
    for (i, r) in net.running() {
        assert!(!r.ipam().needs_timer(), "node {i} still steps on timers");
    }
    // Exhaust node 0's space: the next pod waits for a donation.
    let mut k = 0;
    while let Ok(Allocation::Ready(_)) = allocate(&mut net, 0, &format!("pod-{k}")) {
        k += 1;
    }
    assert!(
        net.router(0).ipam().needs_timer(),
        "a pending pod steps on timers"
    );
}

#[test]
fn allocation_is_idempotent_and_release_too() {
    let mut net = Net::new(2, 22, plain);
    net.run_for(secs(10));
    let a = ready(&mut net, 0, "c1");
    assert_eq!(ready(&mut net, 0, "c1"), a);
    assert_eq!(
        net.call(0, |r, now| r.release(now, "c1")).unwrap(),
        Ok(Some(a))
    );
    assert_eq!(
        net.call(0, |r, now| r.release(now, "c1")).unwrap(),
        Ok(None)
    );
    // A restart keeps allocations: the same container gets the same address.
    let b = ready(&mut net, 1, "c2");
    net.restart(1);
    assert_eq!(ready(&mut net, 1, "c2"), b);
}

#[test]
fn a_minority_partition_never_seeds_and_joins_the_ring_after_healing() {
    let mut net = Net::new(5, 23, plain);
    net.partition(&[&[0, 1], &[2, 3, 4]]);
    net.run_for(secs(20));
    for i in [0, 1] {
        assert!(
            !net.router(i).ipam().ring().is_seeded(),
            "minority node {i} seeded a ring"
        );
        let pending = allocate(&mut net, i, "waiting");
        assert_eq!(
            pending,
            Ok(Allocation::Pending(PendingReason::AwaitingQuorum {
                quorum: 3,
                reachable: 2
            }))
        );
        // A claim (restart recovery) waits for the same reason.
        let claim = net.call(i, |r, now| {
            r.claim(now, "restored", "10.32.1.1".parse().unwrap())
        });
        assert_eq!(
            claim.unwrap(),
            Ok(Allocation::Pending(PendingReason::AwaitingQuorum {
                quorum: 3,
                reachable: 2
            }))
        );
        assert_eq!(
            PendingReason::AwaitingQuorum {
                quorum: 3,
                reachable: 2
            }
            .to_string(),
            "waiting for the IPAM ring to be seeded: 2 of the 3 peers needed for a quorum are reachable"
        );
    }
    for i in [2, 3, 4] {
        assert!(
            net.router(i).ipam().ring().is_seeded(),
            "majority node {i} has no ring"
        );
    }
    net.heal();
    net.run_for(secs(30));
    assert_eq!(ring_summaries(&net).len(), 1);
    for i in [0, 1] {
        let got = net
            .events
            .iter()
            .any(|(_, n, e)| *n == i && matches!(e, Event::Ipam(IpamEvent::Allocated { container, .. }) if container == "waiting"));
        assert!(got, "node {i}'s pending allocation completed by itself");
    }
    assert_unique(&net);
}

#[test]
fn forwarding_follows_ownership_and_routes_around_a_cut() {
    let mut net = Net::new(3, 24, plain);
    net.run_for(secs(10));
    let pod = ready(&mut net, 2, "pod");
    let (b, c) = (net.name(1), net.name(2));
    let underlay = |i: usize| crate::harness::address(i);
    assert_eq!(
        net.router(0).forward(pod),
        Forward::Peer {
            owner: c,
            next_hop: c,
            underlay: underlay(2)
        }
    );
    assert_eq!(net.router(2).forward(pod), Forward::Local);
    assert_eq!(
        net.router(0).forward("8.8.8.8".parse().unwrap()),
        Forward::Unreachable
    );
    net.cut(0, 2);
    net.run_for(secs(10));
    assert_eq!(
        net.router(0).forward(pod),
        Forward::Peer {
            owner: c,
            next_hop: b,
            underlay: underlay(1)
        }
    );
    // The dataplane heard about it as a prefix change.
    let rerouted = net.events.iter().any(|(_, i, e)| {
        *i == 0 && matches!(e, Event::Prefix { forward: Some(Forward::Peer { owner, next_hop, .. }), .. } if *owner == c && *next_hop == b)
    });
    assert!(rerouted);
}

/// A restarted node routes from its saved ring before any timer runs: the
/// kernel dataplane's first sync must see the others' prefixes (their
/// owners unreachable until they reconnect) and its own, not an empty
/// table that would have it delete every route.
#[test]
fn a_restarted_node_knows_the_saved_ring_before_its_first_tick() {
    let mut net = Net::new(3, 26, plain);
    net.run_for(secs(10));
    let pod = ready(&mut net, 2, "pod");
    let own = ready(&mut net, 0, "own");
    let before = net.router(0).forwarding().prefixes().clone();
    net.restart(0);
    let table = net.router(0).forwarding();
    assert_eq!(table.lookup(pod), Forward::Unreachable);
    assert_eq!(table.lookup(own), Forward::Local);
    let keys = |t: &BTreeMap<Ipv4Net, Forward>| t.keys().copied().collect::<Vec<_>>();
    assert_eq!(keys(table.prefixes()), keys(&before));
    // Once reconnected, the owner is reachable again.
    net.run_for(secs(10));
    assert!(matches!(
        net.router(0).forward(pod),
        Forward::Peer { owner, .. } if owner == net.name(2)
    ));
}

#[test]
fn removing_a_deleted_node_hands_its_space_over_once() {
    let mut net = Net::new(3, 25, plain);
    net.run_for(secs(10));
    let gone = net.name(2);
    let owned_by_gone: u64 = net
        .router(2)
        .ipam()
        .own_blocks()
        .iter()
        .map(|b| 1u64 << (32 - b.prefix_len()))
        .sum();
    // Refused while reachable.
    let err = net
        .call(0, |r, now| r.remove_peer(now, gone))
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "refusing to reclaim the space of peer {gone}: it is reachable, so it may still be using its addresses; remove it only after its node is deleted"
        )
    );
    let me = net.name(0);
    assert_eq!(
        net.call(0, |r, now| r.remove_peer(now, me))
            .unwrap()
            .unwrap_err()
            .to_string(),
        format!("cannot remove peer {me}: it is this node")
    );
    net.crash(2);
    net.run_for(secs(10));
    let taken = net
        .call(0, |r, now| r.remove_peer(now, gone))
        .unwrap()
        .unwrap();
    assert_eq!(taken, owned_by_gone);
    assert_eq!(
        net.call(0, |r, now| r.remove_peer(now, gone)).unwrap(),
        Ok(0),
        "only once"
    );
    net.run_for(secs(10));
    assert_eq!(ring_summaries(&net).len(), 1);
    for i in [0, 1] {
        let r = net.router(i);
        assert!(r.ipam().ring().is_removed(gone));
        assert!(r.topology().get(gone).is_none());
    }
    assert_unique(&net);
    // The removed node reinstalled comes back as a new peer and gets space.
    net.wipe(2);
    net.run_for(secs(20));
    assert_ne!(net.name(2), gone);
    let st = net.router(2).status(net.now);
    assert!(
        net.router(2).gateway().is_some(),
        "{}",
        serde_json::to_string_pretty(&st.ipam).unwrap()
    );
    assert_unique(&net);
}

#[test]
fn an_exhausted_range_fails_with_a_clear_error() {
    // A /29: 8 addresses, network and broadcast reserved, 2 gateways: 4 left.
    let mut net = Net::new(2, 26, |_, c| {
        c.ipalloc_range = "10.32.0.0/29".parse().unwrap()
    });
    net.run_for(secs(10));
    let mut got = Vec::new();
    let mut error = None;
    for p in 0..10 {
        match allocate(&mut net, 0, &format!("pod{p}")) {
            Ok(Allocation::Ready(a)) => got.push(a),
            Ok(Allocation::Pending(_)) => net.run_for(secs(5)),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let failed = net.events.iter().find_map(|(_, _, e)| match e {
        Event::Ipam(IpamEvent::AllocationFailed { error, .. }) => Some(error.clone()),
        _ => None,
    });
    let error = error.or(failed).expect("the range ran out");
    assert_eq!(
        error.to_string(),
        "the allocation range 10.32.0.0/29 is exhausted: every address is in use"
    );
    assert_unique(&net);
}

#[test]
fn two_rings_that_meet_report_a_persistent_error_and_never_merge() {
    // Two pairs, each seeding its own ring, then introduced to each other.
    let peers = vec![vec![1], vec![0], vec![3], vec![2]];
    let mut net = Net::with_peers(4, 27, peers, plain);
    net.run_for(secs(10));
    assert_eq!(ring_summaries(&net).len(), 2);
    let addr = crate::harness::address(2);
    net.with(0, |r, now| r.add_peer_address(now, addr));
    net.run_for(secs(20));
    let status = net.router(0).status(net.now);
    assert!(
        status
            .ipam
            .errors
            .iter()
            .any(|e| e.contains("belongs to a different IPAM ring")),
        "{:?}",
        status.ipam.errors
    );
    // Both rings own the same range, so addresses can repeat across them:
    // that is exactly what the error tells the operator to fix.
    assert_eq!(ring_summaries(&net).len(), 2, "the rings stay apart");
    // Still serving its own ring.
    ready(&mut net, 0, "still-works");
}

#[test]
fn node_cidr_mode_allocates_inside_each_nodes_pod_cidr() {
    let cidr = |i: usize| -> Ipv4Net { format!("10.244.{}.0/24", i + 1).parse().unwrap() };
    let mut net = Net::new(3, 28, |i, c| c.ipam = IpamMode::NodeCidr(Some(cidr(i))));
    net.run_for(secs(5));
    for i in 0..3 {
        assert_eq!(
            net.router(i).gateway(),
            Some(format!("10.244.{}.1", i + 1).parse().unwrap())
        );
        let pod = ready(&mut net, i, "pod");
        assert_eq!(
            pod,
            format!("10.244.{}.2", i + 1).parse::<Ipv4Addr>().unwrap()
        );
    }
    let c = net.name(2);
    assert!(
        matches!(net.router(0).forward("10.244.3.2".parse().unwrap()), Forward::Peer { owner, .. } if owner == c)
    );
    let err = net
        .call(0, |r, now| r.claim(now, "x", "10.244.2.9".parse().unwrap()))
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "address 10.244.2.9 is outside the allocation range 10.244.1.0/24"
    );
    let err = net
        .call(0, |r, now| r.remove_peer(now, c))
        .unwrap()
        .unwrap_err();
    assert_eq!(err, IpamError::NotRingMode);
}

#[test]
fn overlapping_pod_cidrs_are_reported() {
    let mut net = Net::new(2, 29, |_, c| {
        c.ipam = IpamMode::NodeCidr(Some("10.244.1.0/24".parse().unwrap()))
    });
    net.run_for(secs(5));
    let errors = net.router(0).status(net.now).ipam.errors;
    assert!(
        errors
            .iter()
            .any(|e| e.contains("overlaps another peer's: give every node a distinct podCIDR")),
        "{errors:?}"
    );
}

#[test]
fn a_pod_cidr_learnt_later_completes_pending_allocations() {
    let mut net = Net::new(1, 30, |_, c| c.ipam = IpamMode::NodeCidr(None));
    assert_eq!(
        allocate(&mut net, 0, "early"),
        Ok(Allocation::Pending(PendingReason::AwaitingPodCidr))
    );
    net.with(0, |r, now| {
        r.set_pod_cidr(now, "10.244.7.0/24".parse().unwrap())
    });
    assert_eq!(
        ready(&mut net, 0, "early"),
        "10.244.7.2".parse::<Ipv4Addr>().unwrap()
    );
}

#[test]
fn observers_never_seed_but_join_an_existing_ring() {
    let mut net = Net::new(2, 31, |_, c| c.ipam = IpamMode::Ring(IpamInit::Observer));
    net.run_for(secs(20));
    assert!(!net.router(0).ipam().ring().is_seeded());
    assert_eq!(
        allocate(&mut net, 0, "p"),
        Ok(Allocation::Pending(PendingReason::AwaitingRing))
    );
}

#[test]
fn claims_and_requests_are_checked_with_messages_people_can_act_on() {
    let mut net = Net::new(2, 32, plain);
    net.run_for(secs(10));
    let theirs = ready(&mut net, 1, "theirs");
    let ours = ready(&mut net, 0, "ours");
    let owner = net.name(1);
    let claim =
        |net: &mut Net, c: &str, a: Ipv4Addr| net.call(0, |r, now| r.claim(now, c, a)).unwrap();
    assert_eq!(
        claim(&mut net, "x", theirs).unwrap_err().to_string(),
        format!("address {theirs} is owned by peer {owner}, not by this node")
    );
    assert_eq!(
        claim(&mut net, "x", ours).unwrap_err().to_string(),
        format!("address {ours} is already allocated to ours")
    );
    assert_eq!(
        claim(&mut net, "x", "192.168.0.1".parse().unwrap())
            .unwrap_err()
            .to_string(),
        "address 192.168.0.1 is outside the allocation range 10.32.0.0/12"
    );
    let network: Ipv4Addr = "10.32.0.0".parse().unwrap();
    if net.router(0).ipam().ring().owner_of(network) == Some(net.name(0)) {
        assert_eq!(
            claim(&mut net, "x", network).unwrap_err().to_string(),
            "address 10.32.0.0 is reserved (network, broadcast or gateway address)"
        );
    }
    assert_eq!(
        allocate(&mut net, 0, "bad:id").unwrap_err().to_string(),
        "invalid container ID \"bad:id\": must be 1 to 256 printable ASCII characters without ':'"
    );
    assert!(allocate(&mut net, 0, "").is_err());
    // A claim of a free address we own is accepted (restart recovery).
    let free = net
        .router(0)
        .ipam()
        .own_blocks()
        .iter()
        .flat_map(|b| b.hosts())
        .find(|a| net.router(0).ipam().allocations().holder(*a).is_none())
        .unwrap();
    assert_eq!(
        claim(&mut net, "recovered", free),
        Ok(Allocation::Ready(free))
    );
    assert_eq!(ready(&mut net, 0, "recovered"), free);
    assert_ne!(GATEWAY_ID, "recovered");
}

#[test]
fn a_changed_range_refuses_to_start_with_instructions() {
    let mut net = Net::new(1, 33, plain);
    net.run_for(secs(1));
    let state = net.router(0).state();
    let mut config = Config::new("node1", crate::harness::address(0));
    config.ipalloc_range = "10.0.0.0/16".parse().unwrap();
    let err = Router::new(config, Some(state), [0; 32], Time::ZERO).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the saved state is for allocation range 10.32.0.0/12, but 10.0.0.0/16 is configured: \
         use --ipalloc-range 10.32.0.0/12, or remove the data directory to start this node afresh with the new range"
    );
}

#[test]
fn persisted_state_round_trips_through_json() {
    let mut net = Net::new(2, 34, plain);
    net.run_for(secs(10));
    let a = ready(&mut net, 0, "c");
    let state = net.router(0).state();
    let json = serde_json::to_string(&state).unwrap();
    let back: crate::PersistedState = serde_json::from_str(&json).unwrap();
    let restored = Router::new(
        net.router(0).config().clone(),
        Some(back),
        [1; 32],
        Time::ZERO,
    )
    .unwrap();
    assert_eq!(restored.name(), net.name(0));
    assert_eq!(restored.ipam().allocations().get("c"), Some(a));
    assert_eq!(restored.ipam().ring(), net.router(0).ipam().ring());
}

/// Each running node's gateway.
fn gateways(net: &Net) -> BTreeMap<usize, Ipv4Addr> {
    net.running()
        .filter_map(|(i, r)| Some((i, r.gateway()?)))
        .collect()
}

/// A node that keeps the space of its gateway keeps its gateway, through
/// restarts too: every pod on the node routes through it.
fn assert_gateways_kept(net: &Net, before: &BTreeMap<usize, Ipv4Addr>) {
    for (i, r) in net.running() {
        let Some(old) = before.get(&i) else { continue };
        if r.ipam().own_blocks().iter().any(|b| b.contains(old)) {
            assert_eq!(r.gateway(), Some(*old), "node {i}'s gateway moved");
        }
    }
}

#[test]
fn a_restart_keeps_the_gateway_and_never_hands_it_to_a_pod() {
    let mut net = Net::new(1, 35, |_, c| {
        c.ipalloc_range = "10.99.0.0/16".parse().unwrap()
    });
    net.run_for(secs(2));
    let gateway = net
        .router(0)
        .gateway()
        .expect("a lone consensus-of-one node has space");
    let pods = [ready(&mut net, 0, "a"), ready(&mut net, 0, "b")];
    assert!(!pods.contains(&gateway));
    net.restart(0);
    assert_eq!(net.router(0).gateway(), Some(gateway));
    net.run_for(secs(1));
    net.crash(0);
    net.start(0);
    assert_eq!(net.router(0).gateway(), Some(gateway));
    let next = ready(&mut net, 0, "c");
    assert!(
        next != gateway && !pods.contains(&next),
        "{next} handed out twice"
    );
}

#[test]
fn no_caller_can_take_or_release_the_gateway() {
    let mut net = Net::new(1, 36, plain);
    net.run_for(secs(2));
    let gateway = net.router(0).gateway().unwrap();
    let refused = IpamError::InvalidContainerId(GATEWAY_ID.into());
    assert_eq!(
        net.call(0, |r, now| r.release(now, GATEWAY_ID)),
        Some(Err(refused.clone()))
    );
    assert_eq!(allocate(&mut net, 0, GATEWAY_ID), Err(refused.clone()));
    assert_eq!(
        net.call(0, |r, now| r.claim(now, GATEWAY_ID, gateway)),
        Some(Err(refused))
    );
    assert_eq!(net.router(0).gateway(), Some(gateway));
}

#[derive(Clone, Debug)]
enum Op {
    Allocate(usize, u8),
    Release(usize, u8),
    Partition(usize),
    Heal,
    Restart(usize),
    CrashAndRemove(usize),
    Run(u64),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..4, 0u8..12).prop_map(|(n, c)| Op::Allocate(n, c)),
        2 => (0usize..4, 0u8..12).prop_map(|(n, c)| Op::Release(n, c)),
        1 => (1usize..4).prop_map(Op::Partition),
        1 => Just(Op::Heal),
        1 => (0usize..4).prop_map(Op::Restart),
        1 => (0usize..4).prop_map(Op::CrashAndRemove),
        3 => (100u64..8000).prop_map(Op::Run),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Random allocations, releases, partitions, restarts and removals
    /// over four peers: no address is ever owned by two peers or held by
    /// two containers, allocation is idempotent, and after healing every
    /// live peer holds the same ring and every request is served.
    #[test]
    fn ipam_stays_unique_and_converges(seed in 0u64..1000, ops in proptest::collection::vec(arb_op(), 1..30)) {
        let mut net = Net::new(4, seed, |_, c| c.ipalloc_range = "10.32.0.0/24".parse().unwrap());
        net.run_for(secs(8));
        let mut given: BTreeMap<(usize, u8), Ipv4Addr> = BTreeMap::new();
        let mut removed = BTreeSet::new();
        for op in ops {
            let gateways = gateways(&net);
            match op {
                Op::Allocate(n, c) => {
                    let result = net.call(n, |r, now| r.allocate(now, &format!("c{c}")));
                    if let Some(Ok(Allocation::Ready(a))) = result
                        && let Some(before) = given.insert((n, c), a)
                    {
                        prop_assert_eq!(before, a, "allocation is idempotent");
                    }
                }
                Op::Release(n, c) => {
                    if net.call(n, |r, now| r.release(now, &format!("c{c}"))).is_some() {
                        given.remove(&(n, c));
                    }
                }
                Op::Partition(k) => {
                    let (a, b): (Vec<usize>, Vec<usize>) = (0..4).partition(|i| *i < k);
                    net.partition(&[&a, &b]);
                }
                Op::Heal => net.heal(),
                Op::Restart(n) if !removed.contains(&n) => net.restart(n),
                Op::Restart(_) => {}
                Op::CrashAndRemove(n) => {
                    if removed.len() < 2 && net.nodes[n].is_some() {
                        let name = net.name(n);
                        net.crash(n);
                        removed.insert(n);
                        given.retain(|(m, _), _| *m != n);
                        net.run_for(secs(8));
                        let heir = (0..4).find(|i| net.nodes[*i].is_some()).unwrap();
                        let _ = net.call(heir, |r, now| r.remove_peer(now, name));
                    }
                }
                Op::Run(ms) => net.run_for(Duration::from_millis(ms)),
            }
            assert_unique(&net);
            assert_gateways_kept(&net, &gateways);
            for (i, r) in net.running() {
                let saved = r.state().ipam.expect("a started node has IPAM state");
                prop_assert_eq!(saved.check(&r.config().ipam), Ok(()), "node {}'s own state refused", i);
            }
        }
        net.heal();
        net.run_for(secs(60));
        assert_unique(&net);
        prop_assert_eq!(ring_summaries(&net).len(), 1, "live peers hold one ring");
        for (_, r) in net.running() {
            let pending: Vec<&str> = r.ipam().pending().collect();
            prop_assert!(pending.is_empty(), "{} still waits for {:?}", r.config().nickname, pending);
        }
    }
}

#[test]
fn every_pending_reason_and_refusal_reads_as_users_see_it() {
    let cases: Vec<(String, &str)> = vec![
        (
            PendingReason::AwaitingRing.to_string(),
            "waiting for the IPAM ring from a peer (this node is an observer and never seeds)",
        ),
        (
            PendingReason::AwaitingPodCidr.to_string(),
            "waiting for this node's podCIDR",
        ),
        (
            PendingReason::AwaitingDonation.to_string(),
            "waiting for a peer with free addresses to donate some",
        ),
        (
            PendingReason::OwnersUnreachable.to_string(),
            "every free address is owned by unreachable peers; if they were deleted from the cluster, remove them to reclaim their space",
        ),
        (
            IpamError::NotRingMode.to_string(),
            "peer removal applies to ring mode only; in node-cidr mode a node's podCIDR goes with its Node object",
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got, want);
    }
}

#[test]
fn reserved_addresses_are_never_claimed_or_handed_out() {
    use super::ring::{Ring, Seed};
    use super::{Ipam, IpamState};
    let me = crate::PeerName(1);
    let range: Ipv4Net = "10.32.0.0/30".parse().unwrap();
    let ring = Ring::seeded(
        range,
        Seed {
            id: 1,
            first_owner: me,
        },
    );
    let state = IpamState {
        ring,
        allocations: Default::default(),
        seeding: Default::default(),
    };
    let mut ipam = Ipam::new(
        me,
        range,
        IpamMode::Ring(IpamInit::Consensus(Some(1))),
        1,
        Some(state),
    );
    let peers = BTreeMap::new();
    assert_eq!(ipam.gateway(), Some("10.32.0.1".parse().unwrap()));
    for reserved in ["10.32.0.0", "10.32.0.3"] {
        assert_eq!(
            ipam.claim("c", reserved.parse().unwrap(), &peers)
                .unwrap_err()
                .to_string(),
            format!("address {reserved} is reserved (network, broadcast or gateway address)")
        );
    }
    assert_eq!(
        ipam.allocate(Time::ZERO, "a", &peers),
        Ok(Allocation::Ready("10.32.0.2".parse().unwrap()))
    );
    assert_eq!(
        ipam.allocate(Time::ZERO, "b", &peers)
            .unwrap_err()
            .to_string(),
        "the allocation range 10.32.0.0/30 is exhausted: every address is in use"
    );
    assert_eq!(
        ipam.claim("c", "10.32.0.1".parse().unwrap(), &peers)
            .unwrap_err()
            .to_string(),
        "address 10.32.0.1 is already allocated to weft:gateway"
    );
}

#[test]
fn config_refusals_say_what_to_do() {
    let mut c = Config::new("n", crate::harness::address(0));
    c.ipalloc_range = "10.32.0.0/31".parse().unwrap();
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "allocation range 10.32.0.0/31 is too small: use a /30 or larger"
    );
    let mut c = Config::new("n", crate::harness::address(0));
    c.ipam = IpamMode::Ring(IpamInit::Consensus(Some(0)));
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "consensus=0 can never seed the ring: give the number of initial peers, or use observer"
    );
}
