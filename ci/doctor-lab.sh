#!/usr/bin/env bash
# `weft doctor` in the netns lab (ci/lab.sh): all ok on a healthy 3-node
# lab (also with --pods), then each check made to fail for its real cause,
# showing the line doctor prints, and put right again:
#   agent stopped, underlay link cut, UDP 6784 dropped by nftables, a
#   node with another password,
#   MTU mismatch, a second conflist that sorts first, overlapping ranges
#   (doctor's check, and the agent refusing to start).
#
#   bash ci/doctor-lab.sh
#
# Env as ci/lab.sh (WEFT_BIN, WEFT_CNI_BIN, DATAPATH=fastdp). Needs root.
set -euo pipefail
export WEFT_LAB_PREFIX=${WEFT_LAB_PREFIX:-wd}
# shellcheck source=ci/lab.sh
source "$(dirname "$0")/lab.sh"

N=3
SERVICES=10.96.0.0/12

# weft doctor on node i, as an operator would run it there.
doctor() {
    local i=$1
    shift
    ip netns exec "$(node_ns "$i")" "$BIN" doctor --socket "$LAB/n$i/weft.sock" \
        --cni-conf-dir "$LAB/n$i/net.d" --cni-bin-dir "$LAB/n$i/bin" \
        --service-cidr "$SERVICES" "$@"
}

# Runs doctor on node i until a line matches the pattern (the agents take
# a few seconds to notice some faults); prints that line.
expect_line() {
    local i=$1 pattern=$2 out
    for _ in $(seq 1 40); do
        out=$(doctor "$i" 2>&1 || true)
        if grep -Eq -- "$pattern" <<<"$out"; then
            log "ok: node$i: $(grep -E -m1 -- "$pattern" <<<"$out")"
            return 0
        fi
        sleep 1
    done
    log "FAIL: node$i never printed a line matching: $pattern"
    echo "$out" >&2
    return 1
}

# Doctor exits with `want` on node i.
expect_exit() {
    local i=$1 want=$2 got=0
    doctor "$i" >/dev/null 2>&1 || got=$?
    [ "$got" = "$want" ] || { log "FAIL: node$i doctor exit $got, want $want"; doctor "$i" >&2 || true; return 1; }
}

all_ok() {
    local i
    for i in $(seq 1 "$N"); do
        doctor "$i" >"$LAB/doctor-$i.out" || {
            log "node$i is not all ok:"
            cat "$LAB/doctor-$i.out" >&2
            return 1
        }
    done
}

install_cni() {
    local i
    for i in $(seq 1 "$N"); do
        "$BIN" install-cni --cni-bin-dir "$LAB/n$i/bin" --cni-conf-dir "$LAB/n$i/net.d" \
            --conflist deploy/10-weft.conflist >/dev/null
    done
}

doctor_lab() {
    trap finish EXIT
    up "$N"
    install_cni
    eventually "every pod reaches every pod" all_pods_reach_all "$N" || {
        # What the nodes looked like, for the one reading CI's log.
        for i in $(seq 1 "$N"); do
            log "--- node$i: weft doctor --pods, routes"
            doctor "$i" --pods >&2 || true
            ip -n "$(node_ns "$i")" route >&2 || true
        done
        return 1
    }

    # Healthy: every line ok, exit 0, within two seconds.
    eventually "doctor: all ok on every node" all_ok
    local start end
    start=$(date +%s%N)
    doctor 1 >/dev/null
    end=$(date +%s%N)
    log "doctor on a healthy node took $(((end - start) / 1000000)) ms"
    sed 's/^/    /' "$LAB/doctor-1.out" >&2
    doctor 1 --pods >"$LAB/pods.out" || { cat "$LAB/pods.out" >&2; log "FAIL: doctor --pods"; return 1; }
    grep -E '^ok +pod ' "$LAB/pods.out" | sed 's/^/    /' >&2
    [ "$(grep -Ec '^ok +pod .*reaches all 2 other nodes' "$LAB/pods.out")" = "$PODS_PER_NODE" ] ||
        { cat "$LAB/pods.out" >&2; log "FAIL: doctor --pods does not reach every node from every pod"; return 1; }
    doctor 1 --json | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["exit"]==0 and all(c["level"]=="ok" for c in d["checks"]), d'
    log "ok: --json agrees"

    # A second conflist that sorts first shadows weft's.
    echo '{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}' >"$LAB/n1/net.d/05-other.conflist"
    expect_line 1 '^FAIL +cni-config +05-other.conflist sorts before weft'
    expect_exit 1 2
    rm "$LAB/n1/net.d/05-other.conflist"

    # MTU mismatch: the underlay shrinks under the agent's VXLAN.
    ip -n "$(node_ns 1)" link set eth0 mtu 1400
    expect_line 1 "^FAIL +mtu .*exceeds the underlay's 1400"
    ip -n "$(node_ns 1)" link set eth0 mtu 1500

    # Overlapping ranges: doctor names the collision, the agent refuses.
    ip -n "$(node_ns 1)" route add 10.40.0.0/16 via 192.168.1.1
    expect_line 1 '^FAIL +range .*the route 10.40.0.0/16 dev eth0 overlaps it'
    ip -n "$(node_ns 1)" route del 10.40.0.0/16 via 192.168.1.1
    local refused
    refused=$(timeout 10 ip netns exec "$(node_ns 1)" "$BIN" router --listen 127.0.0.1:7783 \
        --status-addr 127.0.0.1:7784 --data-dir "$LAB/refused" --socket "$LAB/refused.sock" \
        --ipalloc-range 192.168.0.0/16 2>&1 && echo "started") || true
    grep -q 'the pod range 192.168.0.0/16 collides with this node.s network: eth0 has address 192.168.1.11/24' <<<"$refused" ||
        { log "FAIL: an agent with an overlapping range: $refused"; return 1; }
    log "ok: agent refuses: $(grep -m1 -o 'the pod range.*' <<<"$refused")"
    refused=$(timeout 10 ip netns exec "$(node_ns 1)" "$BIN" router --listen 127.0.0.1:7783 \
        --status-addr 127.0.0.1:7784 --data-dir "$LAB/refused" --socket "$LAB/refused.sock" \
        --service-cidr 10.32.0.0/16 2>&1 && echo "started") || true
    grep -q 'the service range 10.32.0.0/16 overlaps it' <<<"$refused" ||
        { log "FAIL: an agent whose range overlaps --service-cidr: $refused"; return 1; }
    log "ok: agent refuses an overlapping --service-cidr"

    # UDP 6784 dropped on node2: fastdp to it falls back to the sleeve,
    # and doctor says why.
    if [ "$DATAPATH" = fastdp ]; then
        ip netns exec "$(node_ns 2)" nft -f - <<'EOF'
table inet weft_doctor_test {
    chain input { type filter hook input priority 0; udp dport 6784 drop; }
}
EOF
        expect_line 1 '^warn +dataplane .*node2 uses sleeve: .*6784'
        ip netns exec "$(node_ns 2)" nft delete table inet weft_doctor_test
        eventually "pods reach all after 6784 is allowed again" all_pods_reach_all "$N"
    fi

    # Underlay link cut between node1 and node2: relayed through node3,
    # and nothing comes back from node2's ports.
    cut_link 1 2
    expect_line 1 '^FAIL +peer node2 .*UDP 6783 gets no answer'
    heal_link 1 2

    # node2 restarted with a password the others lack: its agent answers
    # probes, but the control plane refuses each other's datagrams.
    local pid
    pid=$(cat "$LAB/n2/agent.pid")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    WEFT_PASSWORD=not-the-same start_agent 2 "$N"
    expect_line 1 '^FAIL +peer node2 .*UDP 6783 answers.*a different WEFT_PASSWORD'
    expect_line 1 '^warn +datagrams +peers. datagrams refused: no_secret'
    pid=$(cat "$LAB/n2/agent.pid")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    start_agent 2 "$N"
    eventually "doctor: all ok once node2 has the same password" all_ok

    # Agent stopped on node3: doctor there fails at once; node1 finds the
    # node up but nothing listening.
    pid=$(cat "$LAB/n3/agent.pid")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    expect_line 3 '^FAIL +agent +no agent answers at 127.0.0.1:6784'
    expect_exit 3 2
    expect_line 1 '^FAIL +peer node3 .*UDP 6783 is refused'
    start_agent 3 "$N"
    eventually "doctor: all ok again" all_ok
    log "all doctor lab checks passed"
}

doctor_lab
