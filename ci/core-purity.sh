#!/usr/bin/env bash
# weft-core must stay sans-IO: no async runtime, socket, netlink or
# Kubernetes crate among its normal dependencies, and no clock, OS RNG or
# socket use in its sources.
set -euo pipefail
cd "$(dirname "$0")/.."
forbidden='^(tokio|async-std|smol|mio|socket2|netlink-|rtnetlink|nix|kube|k8s-openapi|getrandom|libc) '
tree=$(cargo tree -p weft-core -e normal --prefix none --locked | sort -u)
if bad=$(grep -E "$forbidden" <<<"$tree"); then
    echo "weft-core depends on I/O crates:" >&2
    echo "$bad" >&2
    exit 1
fi
if grep -rnE 'Instant::now|SystemTime|thread_rng|OsRng|from_entropy|RandomState|std::net::(UdpSocket|TcpStream|TcpListener)|std::fs|std::thread' core/src; then
    echo "weft-core sources must not read clocks, OS randomness, sockets or files" >&2
    exit 1
fi
# Hash tables iterate in an order that is not the code's to choose: the core
# keeps ordered maps, and its one hash table (fixed hasher, lookups only)
# lives in name_map.rs.
if grep -rnE 'HashMap|HashSet' core/src --exclude=name_map.rs; then
    echo "weft-core keeps ordered maps; for hot lookups by peer name use name_map::NameMap" >&2
    exit 1
fi
echo "weft-core is free of I/O"
