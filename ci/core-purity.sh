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
if grep -rnE 'Instant::now|SystemTime|thread_rng|OsRng|from_entropy|std::net::(UdpSocket|TcpStream|TcpListener)|std::fs|std::thread|HashMap|HashSet' core/src; then
    echo "weft-core sources must not read clocks, OS randomness, sockets or files, nor iterate random-order maps" >&2
    exit 1
fi
echo "weft-core is free of I/O"
