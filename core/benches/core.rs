//! Benchmarks of the core's hot paths at 1,000 peers:
//! `cargo bench -p weft-core --bench core`.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::net::SocketAddr;
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

    let announced = full.announced();
    c.bench_function("routes: compute for 1000 peers x 100 links", |b| {
        b.iter(|| Routes::compute(black_box(PeerName(0)), &announced))
    });

    let routes = Routes::compute(PeerName(0), &announced);
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

criterion_group!(core, benches);
criterion_main!(core);
