#!/usr/bin/env bash
# The import rules between weft's crates and layers (README, "Layout"):
#
#   - weft-core depends on no other weft crate;
#   - weft-driver and weft-api depend on weft-core only
#     (weft-api, the local protocol, also not on tokio or kube: the CNI
#     plugin links it);
#   - weft-kube depends on weft-core and weft-policy only (it feeds the
#     policy model from the API server); weft-dataplane on weft-core and
#     weft-policy (it renders compiled NetworkPolicy rules to nftables);
#   - weft-policy (NetworkPolicy decisions as pure data) depends on no
#     weft crate and not on tokio or kube: the agent, the simulator and
#     the tests all feed it plain values;
#   - weft-dataplane never names the shared router (it reads views);
#   - the pure files of weft-dataplane make no system call, and only its
#     sysctl.rs writes node settings;
#   - in the weft binary only agent/ holds the router (hands it to the
#     driver loop); serve/ and cli/ read values; nothing imports main.rs.
#
# Usage: ci/crate-rules.sh [TREE]   checks TREE (default: this checkout)
#        ci/crate-rules.sh --self-test
#                                   plants one breach of each rule in a copy
#                                   and fails unless every one is caught.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

# The weft crates a crate depends on (normal and build edges), from its
# manifest as cargo reads it.
weft_deps() {
    local tree=$1 crate=$2
    cargo metadata --manifest-path "$tree/Cargo.toml" --format-version 1 --no-deps --offline |
        python3 -c '
import json, sys
crate = sys.argv[1]
meta = json.load(sys.stdin)
for p in meta["packages"]:
    if p["name"] == crate:
        for d in p["dependencies"]:
            if d["name"].startswith("weft") and d.get("kind") in (None, "build"):
                print(d["name"])
' "$crate"
}

# Whether CRATE has a normal dependency on tokio or kube (kube-*, k8s-*).
uses_tokio_or_kube() {
    cargo metadata --manifest-path "$1/Cargo.toml" --format-version 1 --no-deps --offline |
        python3 -c '
import json, sys
crate = sys.argv[1]
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == crate and any(d["name"] == "tokio" or d["name"].startswith(("kube", "k8s-"))
                                  for d in p["dependencies"] if d.get("kind") is None):
        sys.exit(0)
sys.exit(1)' "$2"
}

# Files of weft-dataplane that decide without touching the system.
PURE=(desired.rs plan.rs names.rs status.rs nftables/batch.rs nftables/policy.rs sleeve/gate.rs sleeve/offload.rs probe/wire.rs probe/health.rs)
SYSCALLS='std::fs|std::net::(UdpSocket|TcpStream|TcpListener)|std::process|std::thread|libc::|nix::|tokio::net|rtnetlink|netlink_sys|Instant::now|SystemTime|getifaddrs'

# FILE's lines above its tests (`#[cfg(test)]`), as FILE:LINE: TEXT.
code_of() {
    awk '/^#\[cfg\(test\)\]/{exit} {print FILENAME":"FNR": "$0}' "$1"
}

check() {
    local tree=$1 broken=0
    say() { echo "crate rule broken: $*" >&2; broken=1; }
    local deps
    deps=$(weft_deps "$tree" weft-core)
    [ -z "$deps" ] || say "weft-core depends on $(echo $deps)"
    for crate in weft-driver weft-api; do
        deps=$(weft_deps "$tree" "$crate" | grep -vx weft-core || true)
        [ -z "$deps" ] || say "$crate depends on $(echo $deps) (only weft-core is allowed)"
    done
    for crate in weft-kube weft-dataplane; do
        deps=$(weft_deps "$tree" "$crate" | grep -vxE 'weft-core|weft-policy' || true)
        [ -z "$deps" ] || say "$crate depends on $(echo $deps) (only weft-core and weft-policy are allowed)"
    done
    if grep -rnE 'weft_(driver|kube|dataplane|sim)\b' "$tree/core/src"; then
        say "weft-core sources name another weft crate"
    fi
    for crate in driver kube dataplane api; do
        if grep -rnE 'weft_(driver|kube|dataplane|sim|cni|api)\b|\bweft::' "$tree/$crate/src" |
            grep -vE "^$tree/$crate/src/.*: *//"; then
            say "$crate/src names a weft crate other than weft-core"
        fi
    done
    if uses_tokio_or_kube "$tree" weft-api; then
        say "weft-api depends on tokio or kube (it is blocking and small: the CNI plugin links it)"
    fi
    deps=$(weft_deps "$tree" weft-policy)
    [ -z "$deps" ] || say "weft-policy depends on $(echo $deps) (it depends on no weft crate)"
    if uses_tokio_or_kube "$tree" weft-policy; then
        say "weft-policy depends on tokio or kube (its decisions are pure data)"
    fi
    local f
    # Tests may build routers to get views from; the code may not.
    for f in $(find "$tree/dataplane/src" -name '*.rs' ! -name tests.rs); do
        if code_of "$f" | grep -E 'SharedRouter|Mutex<Router>|weft_core::Router\b|\bRouter::new|\bRouter\b[,}]'; then
            say "weft-dataplane holds the router; it reads weft_core::View"
        fi
    done
    # Node settings are written in one place.
    for f in $(find "$tree/dataplane/src" -name '*.rs' ! -name sysctl.rs); do
        if code_of "$f" | grep -vE '^[^:]+:[0-9]+: *//' | grep -E 'fs::write|"/proc/sys'; then
            say "every /proc/sys write belongs in dataplane/src/sysctl.rs"
        fi
    done
    for f in "${PURE[@]}"; do
        if code_of "$tree/dataplane/src/$f" | grep -E "$SYSCALLS"; then
            say "dataplane/src/$f is pure and must not make system calls"
        fi
    done
    for f in $(find "$tree/node/src" -name '*.rs' ! -path '*/agent/*' ! -name tests.rs); do
        if code_of "$f" | grep -E 'SharedRouter|weft_driver::lock|Mutex<Router>|\bRouter::new'; then
            say "only node/src/agent/ may hold the router; read through weft_driver::read or views"
        fi
    done
    if grep -rnE 'crate::main\b|super::main\b' "$tree/node/src"; then
        say "something imports main.rs"
    fi
    if grep -rnE '^use crate::[A-Z]|crate::[A-Z][A-Za-z]+(::|\b)' "$tree/node/src" |
        grep -v "^$tree/node/src/main.rs:"; then
        say "an item of main.rs is used elsewhere (main.rs holds only clap and dispatch)"
    fi
    return $broken
}

self_test() {
    local copy
    copy=$(mktemp -d)
    trap 'rm -rf "$copy"' RETURN
    # The tree without its build output.
    tar -C "$here" --exclude=./target --exclude=./.git -cf - . | tar -C "$copy" -xf -
    check "$copy" >/dev/null 2>&1 || { echo "self-test: the clean copy already breaks a rule" >&2; return 1; }
    local plant failures=0
    for plant in \
        'sed -i "s|^\[dependencies\]|[dependencies]\nweft-driver = { path = \"../driver\" }|" dataplane/Cargo.toml' \
        'sed -i "s|^\[dependencies\]|[dependencies]\nweft-kube = { path = \"../kube\" }|" dataplane/Cargo.toml' \
        'sed -i "1i fn peek() { let _ = libc::getpid(); }" dataplane/src/nftables/policy.rs' \
        'echo "use weft_driver::SharedRouter;" >> dataplane/src/sync.rs' \
        'sed -i "1i fn peek() { let _ = std::fs::read(\"/x\"); }" dataplane/src/desired.rs' \
        'echo "use weft_dataplane::names;" >> core/src/lib.rs' \
        'echo "use crate::main;" >> node/src/cli/mod.rs' \
        'sed -i "1i type Held = weft_driver::SharedRouter;" node/src/serve/http.rs' \
        'sed -i "1i fn on() { let _ = std::fs::write(\"/proc/sys/net/ipv4/ip_forward\", \"1\"); }" dataplane/src/linux.rs' \
        'sed -i "s|^\[dependencies\]|[dependencies]\nweft-dataplane = { path = \"../dataplane\" }|" api/Cargo.toml' \
        'echo "use weft_dataplane::status::DataplaneState;" >> api/src/status.rs' \
        'sed -i "s|^\[dependencies\]|[dependencies]\ntokio.workspace = true|" api/Cargo.toml' \
        'sed -i "s|^\[dependencies\]|[dependencies]\nweft-driver = { path = \"../driver\" }|" kube/Cargo.toml' \
        'sed -i "s|^\[dependencies\]|[dependencies]\nweft-core = { path = \"../core\" }|" policy/Cargo.toml' \
        'sed -i "s|^\[dependencies\]|[dependencies]\ntokio.workspace = true|" policy/Cargo.toml'; do
        local one
        one=$(mktemp -d)
        cp -a "$copy/." "$one/"
        (cd "$one" && eval "$plant")
        if check "$one" >/dev/null 2>&1; then
            echo "self-test: not caught: $plant" >&2
            failures=1
        else
            echo "self-test: caught: $plant"
        fi
        rm -rf "$one"
    done
    return $failures
}

if [ "${1:-}" = --self-test ]; then
    self_test
    exit
fi
check "${1:-$here}"
echo "crate rules hold"
