#!/usr/bin/env bash
# A CNI plugin chain driven through libcni, the way containerd/CRI-O drive it:
# `cnitool` (built by ci/cnitool.sh against Debian's libcni 1.1.2) runs the
# conflist (weft-cni, then portmap with the portMappings capability) plus the
# loopback plugin for `lo`, for two pods on one node, and checks:
#   ADD x2 -> addresses in the pods, lo up, veths on the bridge, portmap's
#   DNAT rule, the pods ping each other through the bridge -> CHECK x2 ->
#   DEL x2 (veths, DNAT rules and addresses gone) -> DEL again x2 (one with
#   the pod's netns still there, one after it was deleted) -> clean up.
#
#   bash ci/cni-chain.sh [weft|reference]
#
#   weft       (default) a weft agent (`weft router`, fastdp) runs in a node
#              namespace, as ci/lab.sh starts one; the chain is CONFLIST
#              (default deploy/10-weft.conflist) with its socket and logFile
#              pointed at this run's agent.
#   reference  the same checks with Debian's reference plugins, bridge +
#              host-local, then portmap (proves the harness itself).
#
# Env: WEFT_BIN (target/debug/weft), WEFT_CNI_BIN (weft-cni beside it),
# CONFLIST, CNITOOL (default: what ci/cnitool.sh builds), STRICT_VERSION=1
# to fail instead of lowering a cniVersion that the installed libcni or a
# chained plugin does not support (see below), KEEP=1 to leave everything up
# for inspection (then clean up with: ip netns del <name>; kill the agent).
#
# cniVersion: Debian bookworm's libcni and reference plugins are 1.1.x and
# speak CNI up to 1.0.0. A conflist at 1.1.0 cannot run through them
# (portmap refuses it, and libcni cannot parse a 1.1.0 result). Then the
# test copy is lowered to the newest version all plugins of the chain
# support, with a NOTE; STRICT_VERSION=1 makes it an error.
#
# Needs root, iproute2, iptables, ping, python3. Exits non-zero with a
# "FAIL:" line on the first failed check. Takes ~5 s.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-weft}
case "$MODE" in weft | reference) ;; *)
    echo "usage: $0 [weft|reference]" >&2
    exit 2
    ;;
esac

BIN=${WEFT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/weft}
CNI_BIN=${WEFT_CNI_BIN:-$(dirname "$BIN")/weft-cni}
CONFLIST=${CONFLIST:-$PWD/deploy/10-weft.conflist}
CNITOOL=${CNITOOL:-$(bash ci/cnitool.sh)}
REF_DIR=/usr/lib/cni

P=wcc$$              # namespace prefix, unique per run
NODE=$P-node         # where the plugins run (the "host" of the pods)
UNDER=$P-under
T=$(mktemp -d /tmp/weft-cni-chain.XXXXXX)
AGENT_PID=

log() { echo "cni-chain: $*" >&2; }
fail() {
    log "FAIL: $*"
    exit 1
}
ok() { log "ok: $*"; }

cleanup() {
    local rc=$?
    set +e
    if [ "${KEEP:-0}" = 1 ]; then
        log "KEEP=1: left namespaces $P-*, agent pid ${AGENT_PID:-none}, files in $T"
        return $rc
    fi
    if [ -n "$AGENT_PID" ]; then
        kill "$AGENT_PID" 2>/dev/null
        wait "$AGENT_PID" 2>/dev/null
    fi
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    if [ $rc -ne 0 ] && [ -f "$T/agent.log" ]; then
        log "last agent log lines:"
        tail -n 20 "$T/agent.log" >&2 || true
    fi
    if [ $rc -ne 0 ] && [ -f "$T/weft-cni.log" ]; then
        log "weft-cni log:"
        tail -n 20 "$T/weft-cni.log" >&2 || true
    fi
    rm -rf "$T"
    return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || fail "needs root (network namespaces)"
[ -x "$CNITOOL" ] || fail "no cnitool at $CNITOOL (bash ci/cnitool.sh builds it)"
for p in loopback portmap bridge host-local; do
    [ -x "$REF_DIR/$p" ] || fail "no $REF_DIR/$p (apt-get install containernetworking-plugins; ci/cnitool.sh does)"
done
command -v iptables >/dev/null || fail "no iptables (portmap needs it)"

wait_for() {
    local what=$1
    shift
    for _ in $(seq 1 100); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    fail "timed out waiting for $what"
}

in_node() { ip netns exec "$NODE" "$@"; }

ip netns add "$NODE"
ip -n "$NODE" link set lo up

if [ "$MODE" = weft ]; then
    [ -x "$BIN" ] || fail "no agent binary $BIN (cargo build -p weft)"
    [ -x "$CNI_BIN" ] || fail "no plugin $CNI_BIN (cargo build -p weft-cni)"
    [ -f "$CONFLIST" ] || fail "no conflist $CONFLIST"
    CNI_PATH_VAL="$(dirname "$CNI_BIN"):$REF_DIR"
    BRIDGE=weft
    # One node on an underlay, as ci/lab.sh builds it.
    ip netns add "$UNDER"
    ip -n "$UNDER" link add ul type bridge
    ip -n "$UNDER" link set ul up
    ip -n "$NODE" link add eth0 type veth peer name u1 netns "$UNDER"
    ip -n "$UNDER" link set u1 master ul up
    ip -n "$NODE" addr add 192.168.1.11/24 dev eth0
    ip -n "$NODE" link set eth0 up
    ip netns exec "$NODE" "$BIN" router --name node1 --listen 192.168.1.11:6783 \
        --ipalloc-init consensus=1 --datapath fastdp \
        --data-dir "$T/data" --socket "$T/weft.sock" \
        >>"$T/agent.log" 2>&1 &
    AGENT_PID=$!
    wait_for "the agent's socket" test -S "$T/weft.sock"
    wait_for "bridge weft in the node" ip -n "$NODE" link show weft
    kill -0 "$AGENT_PID" 2>/dev/null || fail "the agent exited (see its log above)"
    ok "agent up (pid $AGENT_PID) in $NODE"
    SRC_CONF=$CONFLIST
else
    CNI_PATH_VAL=$REF_DIR
    BRIDGE=cnib$$
    BRIDGE=${BRIDGE:0:15}
    cat >"$T/reference.conflist" <<EOF
{"cniVersion":"1.0.0","name":"reference","plugins":[
  {"type":"bridge","bridge":"$BRIDGE","isGateway":true,"ipMasq":false,
   "ipam":{"type":"host-local","ranges":[[{"subnet":"10.99.0.0/24"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"$T/ipam"}},
  {"type":"portmap","capabilities":{"portMappings":true},"snat":true}]}
EOF
    SRC_CONF=$T/reference.conflist
fi

cnitool() { # cnitool ARGS... (inside the node, with this run's CNI env)
    in_node env CNI_PATH="$CNI_PATH_VAL" CNI_CACHE_DIR="$T/cache" \
        CNI_CONTAINERID="${CID:-}" CNI_IFNAME="${IFN:-eth0}" CAP_ARGS="${CAPS:-}" \
        NETCONFPATH="$T/none" "$CNITOOL" "$@"
}

# The test copy of the conflist: this run's socket and log, and a cniVersion
# that every plugin of the chain (and so libcni) supports.
python3 - "$SRC_CONF" "$T/chain.conflist" "$T/weft.sock" "$T/weft-cni.log" >"$T/types" <<'EOF'
import json, sys
src, dst, sock, logf = sys.argv[1:5]
c = json.load(open(src))
for p in c["plugins"]:
    if p["type"] == "weft-cni":
        p["socket"] = sock
        p["logFile"] = logf
json.dump(c, open(dst, "w"), indent=1)
print(c["cniVersion"])
print(" ".join(p["type"] for p in c["plugins"]))
EOF
WANT_VERSION=$(sed -n 1p "$T/types")
TYPES=$(sed -n 2p "$T/types")
log "chain: $TYPES (cniVersion $WANT_VERSION) from $SRC_CONF"
for t in $TYPES; do
    cnitool version "$t" >"$T/version.$t" || fail "plugin $t: VERSION failed"
done
if ! cnitool validate "$T/chain.conflist" >"$T/validate" 2>&1; then
    [ "${STRICT_VERSION:-0}" = 1 ] && fail "libcni rejects the conflist: $(cat "$T/validate")"
    NEW=$(python3 - "$T" $TYPES <<'EOF'
import json, sys
d, types = sys.argv[1], sys.argv[2:]
sets = [set(json.load(open(f"{d}/version.{t}"))["cniVersion"]) for t in types]
common = set.intersection(*sets)
key = lambda v: tuple(int(x) for x in v.split("."))
print(max(common, key=key) if common else "")
EOF
    )
    [ -n "$NEW" ] || fail "the plugins $TYPES share no CNI version: $(cat "$T/validate")"
    log "NOTE: libcni validate: $(cat "$T/validate")"
    log "NOTE: lowering the test copy's cniVersion $WANT_VERSION -> $NEW (the newest every plugin in the chain supports; STRICT_VERSION=1 fails instead)"
    python3 - "$T/chain.conflist" "$NEW" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1])); c["cniVersion"] = sys.argv[2]
json.dump(c, open(sys.argv[1], "w"), indent=1)
EOF
    cnitool validate "$T/chain.conflist" >"$T/validate" 2>&1 || fail "still invalid: $(cat "$T/validate")"
fi
ok "libcni validate: $(cat "$T/validate")"
echo '{"cniVersion":"1.0.0","name":"cni-loopback","type":"loopback"}' >"$T/loopback.conf"

declare -A IP PORT
PORT[1]=18081
PORT[2]=18082

for i in 1 2; do
    pod=$P-p$i
    ip netns add "$pod"
    CID=$pod IFN=lo cnitool add "$T/loopback.conf" "/var/run/netns/$pod" >"$T/lo-add.$i" 2>&1 ||
        fail "loopback ADD pod $i: $(cat "$T/lo-add.$i")"
    CID=$pod CAPS="{\"portMappings\":[{\"hostPort\":${PORT[$i]},\"containerPort\":80,\"protocol\":\"tcp\"}]}" \
        cnitool add "$T/chain.conflist" "/var/run/netns/$pod" >"$T/add.$i" 2>"$T/add.$i.err" ||
        fail "ADD pod $i: $(cat "$T/add.$i.err" "$T/add.$i")"
    IP[$i]=$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
ifs = r.get("interfaces", [])
for ip in r.get("ips", []):
    i = ip.get("interface")
    if i is not None and ifs[i].get("sandbox") and ifs[i]["name"] == "eth0":
        print(ip["address"].split("/")[0]); break
else:
    sys.exit("no eth0 address in the result")' "$T/add.$i") || fail "ADD pod $i: result without a pod address: $(cat "$T/add.$i")"
    ok "ADD pod $i -> ${IP[$i]}"
done

for i in 1 2; do
    pod=$P-p$i
    ip -n "$pod" -o -4 addr show dev eth0 | grep -q " ${IP[$i]}/" ||
        fail "pod $i: eth0 lacks ${IP[$i]}: $(ip -n "$pod" -o addr show 2>&1)"
    ip -n "$pod" link show lo | grep -q "UP" || fail "pod $i: lo is not up (loopback plugin)"
    ip -n "$pod" route show default | grep -q . || fail "pod $i: no default route"
done
[ "${IP[1]}" != "${IP[2]}" ] || fail "both pods got ${IP[1]}"
ok "addresses in the pods, lo up, default routes"

ports=$(ip -n "$NODE" -o link show master "$BRIDGE" | grep -c . || true)
[ "$ports" -ge 2 ] || fail "bridge $BRIDGE has $ports ports, want >= 2: $(ip -n "$NODE" -o link show master "$BRIDGE" 2>&1)"
ok "both veths on bridge $BRIDGE"

dnat_rules() { in_node iptables -w -t nat -S 2>/dev/null | grep -c -- "--dport $1 " || true; }
for i in 1 2; do
    [ "$(dnat_rules "${PORT[$i]}")" -ge 1 ] || fail "portmap: no DNAT rule for host port ${PORT[$i]} (pod $i)"
done
ok "portmap installed DNAT rules for ${PORT[1]} and ${PORT[2]}"

ip netns exec "$P-p1" ping -c2 -W2 -i 0.2 "${IP[2]}" >"$T/ping" 2>&1 || fail "pod 1 -> pod 2 (${IP[2]}): $(cat "$T/ping")"
ip netns exec "$P-p2" ping -c2 -W2 -i 0.2 "${IP[1]}" >"$T/ping" 2>&1 || fail "pod 2 -> pod 1 (${IP[1]}): $(cat "$T/ping")"
ok "pods ping each other through the bridge"

for i in 1 2; do
    CID=$P-p$i cnitool check "$T/chain.conflist" "/var/run/netns/$P-p$i" >"$T/check" 2>&1 ||
        fail "CHECK pod $i: $(cat "$T/check")"
    CID=$P-p$i IFN=lo cnitool check "$T/loopback.conf" "/var/run/netns/$P-p$i" >"$T/check" 2>&1 ||
        fail "loopback CHECK pod $i: $(cat "$T/check")"
done
ok "CHECK both pods"

del() { # del i -> DEL of the chain and of loopback
    local pod=$P-p$1
    CID=$pod CAPS="{\"portMappings\":[{\"hostPort\":${PORT[$1]},\"containerPort\":80,\"protocol\":\"tcp\"}]}" \
        cnitool del "$T/chain.conflist" "/var/run/netns/$pod" >"$T/del" 2>&1 || fail "DEL pod $1 ($2): $(cat "$T/del")"
    CID=$pod IFN=lo cnitool del "$T/loopback.conf" "/var/run/netns/$pod" >"$T/del" 2>&1 ||
        fail "loopback DEL pod $1 ($2): $(cat "$T/del")"
}
for i in 1 2; do del "$i" first; done
ports=$(ip -n "$NODE" -o link show master "$BRIDGE" | grep -c . || true)
[ "$ports" = 0 ] || fail "after DEL, bridge $BRIDGE still has $ports ports: $(ip -n "$NODE" -o link show master "$BRIDGE")"
for i in 1 2; do
    [ "$(dnat_rules "${PORT[$i]}")" = 0 ] || fail "after DEL, portmap's DNAT rule for ${PORT[$i]} remains"
    ! ip -n "$P-p$i" link show eth0 >/dev/null 2>&1 || fail "after DEL, pod $i still has eth0"
done
if [ "$MODE" = weft ]; then
    # The agent no longer holds the addresses: a third pod can be added and
    # removed, and the agent's API answers "not found" for the old ones.
    for i in 1 2; do
        held=$(python3 - "$T/weft.sock" "{\"op\":\"check\",\"container_id\":\"$P-p$i/eth0\"}" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n"); print(s.makefile().readline().strip())
EOF
        )
        python3 -c 'import json,sys; sys.exit(0 if not json.loads(sys.argv[1]).get("address") else 1)' "$held" ||
            fail "after DEL the agent still holds an address for pod $i: $held"
    done
    ok "the agent released both addresses"
fi
ok "DEL both pods: veths, DNAT rules and pod interfaces gone"

del 1 "again, netns present"
ip netns del "$P-p2"
del 2 "again, netns deleted"
ok "DEL again succeeds (with the netns present, and after it was deleted)"

log "PASS ($MODE: $TYPES via libcni cnitool)"
