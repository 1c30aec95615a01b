#!/usr/bin/env bash
# The netns lab: N weft nodes on this machine, each a network namespace on
# a shared underlay bridge (192.168.1.11, .12, ... exist only inside the
# namespaces), an agent in each, and pods (namespaces) attached to them.
#
#   bash ci/lab.sh up [N]      build N nodes (default 3), start agents, 2 pods per node
#   bash ci/lab.sh test [N]    up, then the checks below, then down
#   bash ci/lab.sh down        remove every namespace, device and process
#
# Env: WEFT_BIN (default target/debug/weft, under CARGO_TARGET_DIR if set), WEFT_CNI_BIN (weft-cni beside
# it), DATAPATH (fastdp), WEFT_PASSWORD.
# Needs root, iproute2, nftables, ping and python3. Pods are attached with weft-cni,
# as a container runtime would.
set -euo pipefail
cd "$(dirname "$0")/.."

LAB=/tmp/weftlab
UNDER=wl-under
BIN=${WEFT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/weft}
CNI_BIN=${WEFT_CNI_BIN:-$(dirname "$BIN")/weft-cni}
DATAPATH=${DATAPATH:-fastdp}
PODS_PER_NODE=2

node_ns() { echo "wl-n$1"; }
node_ip() { echo "192.168.1.$((10 + $1))"; }
pod_ns() { echo "wl-n$1-p$2"; }

log() { echo "lab: $*" >&2; }

down() {
    for pidfile in "$LAB"/n*/agent.pid; do
        [ -f "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
    for ns in $(ip netns list | awk '{print $1}' | grep '^wl-' || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$LAB"
}

start_agent() {
    local i=$1 n=$2 peers=()
    for j in $(seq 1 "$n"); do [ "$j" != "$i" ] && peers+=(--peer "$(node_ip "$j")"); done
    mkdir -p "$LAB/n$i"
    ip netns exec "$(node_ns "$i")" "$BIN" router --name "node$i" \
        --listen "$(node_ip "$i"):6783" "${peers[@]}" \
        --ipalloc-init "consensus=$n" --datapath "$DATAPATH" \
        --data-dir "$LAB/n$i/data" --socket "$LAB/n$i/weft.sock" \
        >>"$LAB/n$i/agent.log" 2>&1 &
    echo $! >"$LAB/n$i/agent.pid"
}

up() {
    local n=${1:-3}
    down
    mkdir -p "$LAB"
    ip netns add "$UNDER"
    ip -n "$UNDER" link add ul type bridge
    ip -n "$UNDER" link set ul up
    for i in $(seq 1 "$n"); do
        local ns
        ns=$(node_ns "$i")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip -n "$ns" link add eth0 type veth peer name "u$i" netns "$UNDER"
        ip -n "$UNDER" link set "u$i" master ul up
        ip -n "$ns" addr add "$(node_ip "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
    # An address outside the cluster, reachable from node1 only: with no
    # route back to the pod range, pods reach it only when masqueraded.
    ip netns add wl-outside
    ip -n wl-outside link set lo up
    ip -n "$(node_ns 1)" link add out0 type veth peer name eth0 netns wl-outside
    ip -n "$(node_ns 1)" addr add 203.0.113.1/24 dev out0
    ip -n "$(node_ns 1)" link set out0 up
    ip -n wl-outside addr add 203.0.113.2/24 dev eth0
    ip -n wl-outside link set eth0 up
    for i in $(seq 1 "$n"); do start_agent "$i" "$n"; done
    for i in $(seq 1 "$n"); do
        for p in $(seq 1 "$PODS_PER_NODE"); do attach_pod "$i" "$p"; done
    done
}

# Attaches pod p to node i the way a container runtime does: weft-cni ADD
# inside the node's namespace.
attach_pod() {
    local i=$1 p=$2 ns pns result
    ns=$(node_ns "$i")
    pns=$(pod_ns "$i" "$p")
    ip netns add "$pns" 2>/dev/null || true
    wait_for "bridge weft on node$i" ip -n "$ns" link show weft
    result=$(echo "{\"cniVersion\":\"1.0.0\",\"name\":\"weft\",\"type\":\"weft-cni\",\"socket\":\"$LAB/n$i/weft.sock\"}" |
        ip netns exec "$ns" env CNI_COMMAND=ADD CNI_CONTAINERID="pod-$i-$p" \
            CNI_NETNS="/var/run/netns/$pns" CNI_IFNAME=eth0 CNI_PATH="$(dirname "$CNI_BIN")" "$CNI_BIN") ||
        { log "weft-cni ADD pod-$i-$p failed: $result"; return 1; }
    python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ips"][0]["address"].split("/")[0])' \
        "$result" >"$LAB/n$i/pod-$p.ip"
}

# The address node i's agent holds for pod p.
held_address() {
    api "$1" "{\"op\":\"check\",\"container_id\":\"pod-$1-$2/eth0\"}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["address"].split("/")[0])'
}

api() {
    python3 - "$LAB/n$1/weft.sock" "$2" <<'EOF'
import socket, sys, time
for _ in range(100):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        break
    except OSError:
        time.sleep(0.2)
s.sendall(sys.argv[2].encode() + b"\n")
print(s.makefile().readline().strip())
EOF
}

wait_for() {
    local what=$1
    shift
    for _ in $(seq 1 100); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    log "timed out waiting for $what"
    return 1
}

# Every pod pings every pod on other nodes.
all_pods_reach_all() {
    local n=$1 failed=0
    for i in $(seq 1 "$n"); do for p in $(seq 1 "$PODS_PER_NODE"); do
        for j in $(seq 1 "$n"); do for q in $(seq 1 "$PODS_PER_NODE"); do
            [ "$i$p" = "$j$q" ] && continue
            local dst
            dst=$(cat "$LAB/n$j/pod-$q.ip")
            if ! ip netns exec "$(pod_ns "$i" "$p")" ping -c1 -W2 "$dst" >/dev/null 2>&1; then
                log "pod-$i-$p -> pod-$j-$q ($dst): no answer"
                failed=1
            fi
        done; done
    done; done
    return $failed
}

eventually() {
    local what=$1
    shift
    for _ in $(seq 1 30); do
        "$@" 2>/dev/null && { log "ok: $what"; return 0; }
        sleep 1
    done
    "$@" || { log "FAIL: $what"; return 1; }
}

cut_link() { # drop underlay traffic between nodes a and b (both ways)
    ip netns exec "$(node_ns "$1")" ip route add blackhole "$(node_ip "$2")/32"
    ip netns exec "$(node_ns "$2")" ip route add blackhole "$(node_ip "$1")/32"
}

heal_link() {
    ip netns exec "$(node_ns "$1")" ip route del blackhole "$(node_ip "$2")/32"
    ip netns exec "$(node_ns "$2")" ip route del blackhole "$(node_ip "$1")/32"
}

# On failure, the agents' last words, then a clean slate.
finish() {
    local status=$?
    if [ "$status" != 0 ]; then
        for f in "$LAB"/n*/agent.log; do
            [ -f "$f" ] && { log "--- $f"; tail -n 15 "$f" >&2; }
        done
    fi
    down
}

test_lab() {
    local n=${1:-3}
    trap finish EXIT
    up "$n"
    eventually "every pod reaches every pod ($DATAPATH)" all_pods_reach_all "$n"

    eventually "pods reach an address outside the cluster (masquerade)" \
        ip netns exec "$(pod_ns 1 1)" ping -q -c1 -W2 203.0.113.2 >/dev/null

    cut_link 1 2
    eventually "with node1-node2 cut, traffic goes through node3" all_pods_reach_all "$n"
    heal_link 1 2

    local old
    old=$(cat "$LAB/n1/agent.pid")
    kill -9 "$old"
    # Restarted once the old process is gone (it holds the UDP port).
    wait "$old" 2>/dev/null || true
    start_agent 1 "$n"
    for p in $(seq 1 "$PODS_PER_NODE"); do
        local held
        held=$(held_address 1 "$p")
        [ "$held" = "$(cat "$LAB/n1/pod-$p.ip")" ] ||
            { log "FAIL: pod-1-$p holds $held after kill -9, was $(cat "$LAB/n1/pod-$p.ip")"; return 1; }
    done
    log "ok: kill -9 and restart keeps every pod address"
    eventually "connectivity after the restart" all_pods_reach_all "$n"

    for j in $(seq 2 "$n"); do cut_link 1 "$j"; done
    sleep 8
    for j in $(seq 2 "$n"); do heal_link 1 "$j"; done
    eventually "a partition heals" all_pods_reach_all "$n"
    log "all lab checks passed"
}

case "${1:-}" in
up) up "${2:-3}" ;;
down) down ;;
test) test_lab "${2:-3}" ;;
*)
    echo "usage: $0 up [N] | test [N] | down" >&2
    exit 2
    ;;
esac
