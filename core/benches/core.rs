//! Benchmarks of the core's hot paths at 1,000 peers:
//! `cargo bench -p weft-core --bench core`.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::net::SocketAddr;
use weft_core::forward::{Forward, ForwardingTable};
use weft_core::ipam::ring::{Block, Label, Ring, Seed};
use weft_core::ipam::{Allocation, Ipam, IpamInit, IpamMode, IpamState};
use weft_core::wire::{Frame, Message, pack_gossip};
use weft_core::{PeerEntry, PeerName, Routes, Topology};

const PEERS: u64 = 1000;
const DEGREE: usize = 100;

/// splitmix64: a deterministic graph without a rand dependency.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 1,000 peers, each with ~100 symmetric connections.
fn cluster() -> Vec<PeerEntry> {
    let mut conns: BTreeMap<u64, BTreeSet<u64>> =
        (0..PEERS).map(|p| (p, BTreeSet::new())).collect();
    let mut s = 42;
    for p in 0..PEERS {
        while conns[&p].len() < DEGREE / 2 {
            let q = next(&mut s) % PEERS;
            if q != p {
                conns.get_mut(&p).unwrap().insert(q);
                conns.get_mut(&q).unwrap().insert(p);
            }
        }
    }
    conns
        .into_iter()
        .map(|(p, c)| PeerEntry {
            version: 1,
            name: PeerName(p),
            nickname: format!("node{p}"),
            address: SocketAddr::from(([10, 0, (p >> 8) as u8, p as u8], 6783)),
            connections: c.into_iter().take(128).map(PeerName).collect(),
            ipam: Default::default(),
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let entries = cluster();
    let own = entries[0].clone();

    c.bench_function("topology: merge 1000 new entries", |b| {
        b.iter_batched(
            || Topology::new(own.clone()),
            |mut t| {
                for e in &entries {
                    black_box(t.merge(e.clone()));
                }
                t
            },
            BatchSize::LargeInput,
        )
    });

    let mut full = Topology::new(own.clone());
    entries.iter().for_each(|e| {
        full.merge(e.clone());
    });
    c.bench_function("topology: merge 1000 already-known entries", |b| {
        b.iter(|| {
            for e in &entries {
                black_box(full.merge(e.clone()));
            }
        })
    });

    // The same input the router builds: each entry's ascending connections.
    let claims: Vec<(PeerName, &[PeerName])> = full
        .entries()
        .map(|e| (e.name, e.connections.as_slice()))
        .collect();
    c.bench_function("routes: compute for 1000 peers x 100 links", |b| {
        b.iter(|| Routes::compute_sorted(black_box(PeerName(0)), &claims))
    });

    // Real names are random 64-bit values, not 0..1000.
    let random = |p: PeerName| PeerName(next(&mut p.0.clone()));
    let mut renamed: Vec<(PeerName, Vec<PeerName>)> = claims
        .iter()
        .map(|(p, cs)| {
            let mut cs: Vec<PeerName> = cs.iter().map(|c| random(*c)).collect();
            cs.sort_unstable();
            (random(*p), cs)
        })
        .collect();
    renamed.sort_unstable();
    let random_claims: Vec<(PeerName, &[PeerName])> =
        renamed.iter().map(|(p, cs)| (*p, cs.as_slice())).collect();
    let me = random_claims[0].0;
    c.bench_function("routes: compute for 1000 random names x 100 links", |b| {
        b.iter(|| Routes::compute_sorted(black_box(me), &random_claims))
    });

    let routes = Routes::compute_sorted(PeerName(0), &claims);
    c.bench_function("routes: next_hop lookup", |b| {
        let mut s = 7;
        b.iter(|| routes.next_hop(PeerName(next(&mut s) % PEERS)))
    });

    let messages = pack_gossip(&entries);
    let datagrams: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| m.encode_plain(PeerName(1)).unwrap())
        .collect();
    c.bench_function("wire: decode the whole 1000-peer topology", |b| {
        b.iter(|| {
            for d in &datagrams {
                black_box(Frame::parse(d).and_then(|f| f.plain_message()).is_ok());
            }
        })
    });
    c.bench_function("wire: pack and encode the whole 1000-peer topology", |b| {
        b.iter(|| {
            pack_gossip(&entries)
                .iter()
                .map(|m: &Message| m.encode_plain(PeerName(1)).unwrap().len())
                .sum::<usize>()
        })
    });
}

/// The default /12 split among 1,000 peers: 1,024 /22 blocks, as many
/// donations would leave it.
fn ring_of_1000_peers() -> Ring {
    let universe: ipnet::Ipv4Net = "10.32.0.0/12".parse().unwrap();
    let mut ring = Ring::seeded(
        universe,
        Seed {
            id: 1,
            first_owner: PeerName(0),
        },
    );
    let blocks: Vec<Block> = universe
        .subnets(22)
        .unwrap()
        .enumerate()
        .map(|(i, prefix)| Block {
            prefix,
            label: Label {
                version: 2,
                owner: PeerName(i as u64 % PEERS),
            },
        })
        .collect();
    ring.merge_blocks(&blocks);
    ring
}

fn ipam_benches(c: &mut Criterion) {
    let ring = ring_of_1000_peers();
    let owned: Vec<(ipnet::Ipv4Net, PeerName)> =
        ring.blocks().map(|b| (b.prefix, b.label.owner)).collect();
    let underlay = SocketAddr::from(([192, 168, 1, 1], 6783));
    let (table, _) = ForwardingTable::build(owned.clone(), |owner| {
        if owner == PeerName(0) {
            Forward::Local
        } else {
            Forward::Peer {
                owner,
                next_hop: owner,
                underlay,
            }
        }
    });
    c.bench_function("forward: lookup among 1000 peers' prefixes", |b| {
        let mut s = 11;
        b.iter(|| {
            let addr = std::net::Ipv4Addr::from(0x0a20_0000 + (next(&mut s) as u32 & 0x000f_ffff));
            black_box(table.lookup(addr))
        })
    });
    c.bench_function("forward: rebuild the table for 1000 peers", |b| {
        b.iter(|| ForwardingTable::build(owned.clone(), |_| Forward::Unreachable))
    });

    let state = IpamState {
        ring,
        allocations: Default::default(),
        seeding: Default::default(),
    };
    let mode = IpamMode::Ring(IpamInit::Consensus(Some(1)));
    let mut ipam = Ipam::new(
        PeerName(0),
        "10.32.0.0/12".parse().unwrap(),
        mode,
        1,
        Some(state),
    );
    let peers = BTreeMap::new();
    for i in 0..200 {
        ipam.allocate(weft_core::Time::ZERO, &format!("pod-{i}"), &peers)
            .unwrap();
    }
    c.bench_function("ipam: allocate + release with 200 pods on a node", |b| {
        b.iter(|| {
            let got = ipam
                .allocate(weft_core::Time::ZERO, "bench-pod", &peers)
                .unwrap();
            assert!(matches!(got, Allocation::Ready(_)));
            ipam.release("bench-pod").unwrap()
        })
    });
}

criterion_group!(core, benches, ipam_benches);
criterion_main!(core);
