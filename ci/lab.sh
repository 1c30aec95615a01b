#!/usr/bin/env bash
# The netns lab: N weft nodes on this machine, each a network namespace on
# a shared underlay bridge (192.168.1.11, .12, ... exist only inside the
# namespaces), an agent in each, and pods (namespaces) attached to them.
#
#   bash ci/lab.sh up [N]      build N nodes (default 3), start agents, 2 pods per node
#   bash ci/lab.sh test [N]    up, then the checks below, then down
#   bash ci/lab.sh down        remove every namespace, device and process
#
# Env: WEFT_LAB_PREFIX (namespace prefix, default wl), WEFT_BIN (default target/debug/weft, under CARGO_TARGET_DIR if set), WEFT_CNI_BIN (weft-cni beside
# it), DATAPATH (fastdp), WEFT_PASSWORD. Agents run with an empty PATH (no nft, like the image).
# Needs root, iproute2, nftables, ping and python3. Pods are attached with weft-cni,
# as a container runtime would.
set -euo pipefail
cd "$(dirname "$0")/.."

# Namespaces are named <prefix>-…; another prefix is another lab, which can
# run beside this one (ci/doctor-lab.sh uses its own).
PREFIX=${WEFT_LAB_PREFIX:-wl}
LAB=/tmp/weftlab-$PREFIX
UNDER=$PREFIX-under
BIN=${WEFT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/weft}
CNI_BIN=${WEFT_CNI_BIN:-$(dirname "$BIN")/weft-cni}
DATAPATH=${DATAPATH:-fastdp}
PODS_PER_NODE=2

node_ns() { echo "$PREFIX-n$1"; }
node_ip() { echo "192.168.1.$((10 + $1))"; }
pod_ns() { echo "$PREFIX-n$1-p$2"; }

log() { echo "lab: $*" >&2; }

down() {
    for pidfile in "$LAB"/n*/agent.pid; do
        [ -f "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
    for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$LAB"
}

start_agent() {
    local i=$1 n=$2 peers=()
    for j in $(seq 1 "$n"); do [ "$j" != "$i" ] && peers+=(--peer "$(node_ip "$j")"); done
    mkdir -p "$LAB/n$i"
    # PATH names no directory, as in the shipped image (FROM scratch): the
    # agent must program the kernel, masquerade included, without `nft`.
    ip netns exec "$(node_ns "$i")" env PATH=/nonexistent "$BIN" router --name "node$i" \
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
    ip netns add "$PREFIX-outside"
    ip -n "$PREFIX-outside" link set lo up
    ip -n "$(node_ns 1)" link add out0 type veth peer name eth0 netns "$PREFIX-outside"
    ip -n "$(node_ns 1)" addr add 203.0.113.1/24 dev out0
    ip -n "$(node_ns 1)" link set out0 up
    ip -n "$PREFIX-outside" addr add 203.0.113.2/24 dev eth0
    ip -n "$PREFIX-outside" link set eth0 up
    # A node that does not pass bridged traffic to iptables: the agent
    # must turn it on (per network namespace; absent without br_netfilter).
    if [ -d /proc/sys/net/bridge ]; then
        ip netns exec "$(node_ns 1)" sh -c 'echo 0 >/proc/sys/net/bridge/bridge-nf-call-iptables'
    fi
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

# Removes pod p from node i as a container runtime does: weft-cni DEL,
# then the pod's namespace goes.
detach_pod() {
    local i=$1 p=$2 pns
    pns=$(pod_ns "$i" "$p")
    echo "{\"cniVersion\":\"1.0.0\",\"name\":\"weft\",\"type\":\"weft-cni\",\"socket\":\"$LAB/n$i/weft.sock\"}" |
        ip netns exec "$(node_ns "$i")" env CNI_COMMAND=DEL CNI_CONTAINERID="pod-$i-$p" \
            CNI_NETNS="/var/run/netns/$pns" CNI_IFNAME=eth0 CNI_PATH="$(dirname "$CNI_BIN")" "$CNI_BIN" ||
        { log "weft-cni DEL pod-$i-$p failed"; return 1; }
    ip netns del "$pns"
    rm -f "$LAB/n$i/pod-$p.ip"
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

# Whether node i's agent sends pod traffic for the peer nicknamed $2 over
# dataplane $3 ("sleeve" must come with a reason), per /status/connections.
peer_dataplane_is() {
    ip netns exec "$(node_ns "$1")" python3 - "$2" "$3" <<'EOF'
import json, sys, urllib.request
name, want = sys.argv[1], sys.argv[2]
status = json.load(urllib.request.urlopen("http://127.0.0.1:6784/status/connections", timeout=2))
peer = [p for p in status["dataplane"]["peers"] if p["nickname"] == name]
ok = len(peer) == 1 and peer[0]["dataplane"] == want and (want != "sleeve" or peer[0]["reason"])
sys.exit(0 if ok else 1)
EOF
}

peers_see() { # peers_see NICK DATAPLANE NODE...: every NODE sees NICK on DATAPLANE
    local nick=$1 want=$2 i
    shift 2
    for i in "$@"; do peer_dataplane_is "$i" "$nick" "$want" || return 1; done
}

wait_until() { # wait_until SECS WHAT CMD...
    local secs=$1 what=$2 t
    shift 2
    for t in $(seq 1 "$secs"); do
        "$@" 2>/dev/null && { log "ok: $what (${t} s)"; return 0; }
        sleep 1
    done
    "$@" || { log "FAIL: $what (not within $secs s)"; return 1; }
}

# A firewall on node2 drops VXLAN (UDP 6784) while gossip (UDP 6783) still
# works: node1 and node3 must notice within 15 s and carry node2's pod
# traffic over the sleeve, and return to fastdp once the rule is gone.
fastdp_probe_check() {
    local n=$1 ns
    ns=$(node_ns 2)
    ip netns exec "$ns" nft -f - <<'EOF'
table inet weftlab-probe {
    chain input {
        type filter hook input priority -10;
        udp dport 6784 drop
    }
}
EOF
    wait_until 15 "with UDP 6784 dropped on node2, node1 and node3 use the sleeve to it" \
        peers_see node2 sleeve 1 3 || return 1
    ip netns exec "$(node_ns 1)" python3 -c '
import json, urllib.request
s = json.load(urllib.request.urlopen("http://127.0.0.1:6784/status/connections", timeout=2))
for p in s["dataplane"]["peers"]:
    print("lab: node1 -> %s: %s (%s)" % (p["nickname"], p["dataplane"], p["reason"]))' >&2
    eventually "with UDP 6784 dropped on node2, every pod reaches every pod" all_pods_reach_all "$n" ||
        return 1
    ip netns exec "$ns" nft delete table inet weftlab-probe
    wait_until 15 "without the rule node1 and node3 use fastdp to node2 again" \
        peers_see node2 fastdp 1 3 || return 1
    eventually "every pod reaches every pod on fastdp again" all_pods_reach_all "$n"
}

# The value of a /metrics sample of node i's agent (0 when absent).
metric() { # metric I SERIES
    ip netns exec "$(node_ns "$1")" python3 - "$2" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:6784/metrics", timeout=2).read().decode()
print(next((l.rsplit(" ", 1)[1] for l in text.splitlines() if l.startswith(sys.argv[1] + " ")), 0))
EOF
}

# A sleeve frame from a host that is no weft peer never reaches a pod: the
# outside host (203.0.113.2) sends node1 plain frames carrying a UDP
# datagram for pod-1-1, which must not receive it; node1 counts the drops.
spoofed_sleeve_frame_check() {
    local dst before after listener version
    dst=$(cat "$LAB/n1/pod-1.ip")
    before=$(metric 1 'weft_sleeve_dropped_total{reason="not_connected"}')
    ip -n "$PREFIX-outside" route add "$(node_ip 1)/32" via 203.0.113.1
    ip netns exec "$(pod_ns 1 1)" python3 - <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(3)
try:
    s.recvfrom(100)
    sys.exit(1)
except socket.timeout:
    sys.exit(0)
EOF
    listener=$!
    sleep 0.5
    # The wire version the agents speak: a frame of another is refused
    # before the sleeve sees it.
    version=$(sed -n 's/^pub const VERSION: u8 = \([0-9]*\);$/\1/p' core/src/wire.rs)
    ip netns exec "$PREFIX-outside" python3 - "$dst" "$(node_ip 1)" "$version" <<'EOF'
import socket, struct, sys, time
src, dst = socket.inet_aton("203.0.113.2"), socket.inet_aton(sys.argv[1])
udp = struct.pack("!HHHH", 4444, 9999, 8 + 7, 0) + b"spoofed"
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
c = sum(struct.unpack("!10H", ip))
c = (c >> 16) + (c & 0xFFFF)
c = ~(c + (c >> 16)) & 0xFFFF
ip = ip[:10] + struct.pack("!H", c) + ip[12:]
# "WEFT", the wire version, kind 2 (plain sleeve frame), a made-up sender.
frame = b"WEFT" + bytes([int(sys.argv[3]), 2]) + struct.pack("!Q", 0x5EED) + ip + udp
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(frame, (sys.argv[2], 6783))
    time.sleep(0.1)
EOF
    ip -n "$PREFIX-outside" route del "$(node_ip 1)/32" via 203.0.113.1
    wait "$listener" || { log "FAIL: a sleeve frame from a non-peer reached pod-1-1"; return 1; }
    after=$(metric 1 'weft_sleeve_dropped_total{reason="not_connected"}')
    [ "$after" -ge $((before + 5)) ] ||
        { log "FAIL: sleeve drops from a non-peer counted $before -> $after, not +5"; return 1; }
    log "ok: sleeve frames from a non-peer are dropped and counted"
}

cut_link() { # drop underlay traffic between nodes a and b (both ways)
    ip netns exec "$(node_ns "$1")" ip route add blackhole "$(node_ip "$2")/32"
    ip netns exec "$(node_ns "$2")" ip route add blackhole "$(node_ip "$1")/32"
}

heal_link() {
    ip netns exec "$(node_ns "$1")" ip route del blackhole "$(node_ip "$2")/32"
    ip netns exec "$(node_ns "$2")" ip route del blackhole "$(node_ip "$1")/32"
}

# The default gateway pod p of node i routes through.
pod_gateway() {
    ip -n "$(pod_ns "$1" "$2")" route show default | awk '{print $3}'
}

restart_agent() { # restart_agent I N SIGNAL
    local old
    old=$(cat "$LAB/n$1/agent.pid")
    kill -"$3" "$old"
    # Restarted once the old process is gone (it holds the UDP port).
    wait "$old" 2>/dev/null || true
    start_agent "$1" "$2"
}

# After a restart, node i's bridge still holds the gateway its pods route
# through, they reach it and the outside (masquerade) through it, and a
# new pod does not get it.
gateway_kept() { # gateway_kept I GATEWAY HOW
    local i=$1 gateway=$2 how=$3 new=$((PODS_PER_NODE + 1)) got
    eventually "after $how node$i's bridge keeps the gateway $gateway" \
        sh -c "ip -n $(node_ns "$i") -br addr show weft | grep -q ' $gateway/'" || return 1
    eventually "after $how pod-$i-1 reaches its gateway $gateway" \
        ip netns exec "$(pod_ns "$i" 1)" ping -q -c1 -W2 "$gateway" >/dev/null || return 1
    eventually "after $how pod-$i-1 reaches an address outside the cluster (masquerade)" \
        ip netns exec "$(pod_ns "$i" 1)" ping -q -c1 -W2 203.0.113.2 >/dev/null || return 1
    # The kernel state above outlives the agent; a new pod needs the new
    # agent listening (a killed one leaves its socket file behind).
    wait_for "node$i's agent after $how" api "$i" '{"op":"status"}' || return 1
    attach_pod "$i" "$new" || return 1
    got=$(cat "$LAB/n$i/pod-$new.ip")
    [ "$got" != "$gateway" ] ||
        { log "FAIL: after $how a new pod got the gateway's address $gateway"; return 1; }
    log "ok: after $how a new pod got $got, not the gateway $gateway"
    detach_pod "$i" "$new"
}

# On failure, the agents' last words, then a clean slate.
SERVICE=10.96.0.10

# kube-proxy (iptables mode) in miniature on node1: Service $SERVICE:80
# DNATed to pod BACKEND's port 8080, whose traffic to itself through the
# Service is masqueraded (kube-proxy's KUBE-MARK-MASQ for an endpoint's own
# traffic).
kube_proxy_rules() { # kube_proxy_rules -A|-D BACKEND
    local ns dst
    ns=$(node_ns 1)
    dst=$(cat "$LAB/n1/pod-$2.ip")
    ip netns exec "$ns" iptables -t nat "$1" PREROUTING -d "$SERVICE" -p tcp --dport 80 \
        -j DNAT --to-destination "$dst:8080"
    ip netns exec "$ns" iptables -t nat "$1" POSTROUTING -s "$dst" -d "$dst" -p tcp --dport 8080 \
        -j MASQUERADE
}

# Pod-1-P connects to the Service and reads what the backend sends.
service_answers() { # service_answers P WANT
    local got
    got=$(ip netns exec "$(pod_ns 1 "$1")" python3 -c '
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=2)
print(s.recv(64).decode().strip())' "$SERVICE" 2>/dev/null) || return 1
    [ "$got" = "$2" ]
}

bridge_nf_call_iptables_is() { # on node1
    [ "$(ip netns exec "$(node_ns 1)" cat /proc/sys/net/bridge/bridge-nf-call-iptables)" = "$1" ]
}

# A Service whose backend is on the client's node: the backend answers
# the client straight over the bridge, and only with
# net.bridge.bridge-nf-call-iptables=1 does that reply pass conntrack to
# get the Service address back as its source. Then a pod whose only
# backend is itself (masqueraded, as kube-proxy does, so the reply comes
# back from the bridge's gateway address).
same_node_service_check() {
    if [ ! -d /proc/sys/net/bridge ]; then
        log "SKIP: br_netfilter is not loaded on this machine: no same-node Service check"
        return 0
    fi
    local server
    eventually "node1's agent set net.bridge.bridge-nf-call-iptables from 0 to 1" \
        bridge_nf_call_iptables_is 1
    ip netns exec "$(pod_ns 1 2)" python3 -c '
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"pod-1-2\n")
    c.close()' &
    server=$!
    kube_proxy_rules -A 2
    eventually "pod-1-1 reaches a Service whose backend (pod-1-2) is on its node" service_answers 1 pod-1-2
    eventually "pod-1-2 reaches a Service whose only backend is itself (hairpin)" service_answers 2 pod-1-2
    kube_proxy_rules -D 2
    kill "$server"
    ip netns exec "$(node_ns 1)" sh -c 'echo 0 >/proc/sys/net/bridge/bridge-nf-call-iptables'
    wait_until 65 "node1's agent sets net.bridge.bridge-nf-call-iptables back to 1 at a resync (every 30 s)" \
        bridge_nf_call_iptables_is 1
}

# The kernel dataplane outlives the agent, its own and its peers': a
# continuous ping (20 a second for 12 s) from pod-2-1 to pod-3-1 while node I's
# agent restarts (SIGTERM) loses at most one reply. The sleeve is carried by
# the agents themselves: there the loss is only measured.
ping_through_restart() { # ping_through_restart I N
    local i=$1 n=$2 dst out sent got
    dst=$(cat "$LAB/n3/pod-1.ip")
    out="$LAB/ping-during-restart-$i"
    ip netns exec "$(pod_ns 2 1)" ping -q -i 0.05 -W 1 -c 240 "$dst" >"$out" 2>&1 &
    local pinger=$!
    sleep 1
    restart_agent "$i" "$n" TERM
    wait "$pinger" || true
    sent=$(awk '/packets transmitted/ {print $1}' "$out")
    got=$(awk '/packets transmitted/ {print $4}' "$out")
    [ -n "$sent" ] || { log "FAIL: no ping statistics"; cat "$out" >&2; return 1; }
    log "pod-2-1 -> pod-3-1 while node$i's agent restarts ($DATAPATH): $((sent - got)) of $sent lost"
    [ "$DATAPATH" = sleeve ] && return 0
    [ $((sent - got)) -le 1 ] ||
        { log "FAIL: a restart of node$i's agent interrupts pod traffic"; cat "$out" >&2; return 1; }
    log "ok: node$i's agent restarts without interrupting pod traffic"
}

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

    if [ "$DATAPATH" = fastdp ] && [ "$n" -ge 3 ]; then
        fastdp_probe_check "$n"
    fi

    spoofed_sleeve_frame_check

    same_node_service_check

    cut_link 1 2
    eventually "with node1-node2 cut, traffic goes through node3" all_pods_reach_all "$n"
    heal_link 1 2

    local gateway
    gateway=$(pod_gateway 1 1)
    restart_agent 1 "$n" TERM
    gateway_kept 1 "$gateway" "SIGTERM" || return 1
    restart_agent 1 "$n" KILL
    gateway_kept 1 "$gateway" "kill -9" || return 1
    for p in $(seq 1 "$PODS_PER_NODE"); do
        local held
        held=$(held_address 1 "$p")
        [ "$held" = "$(cat "$LAB/n1/pod-$p.ip")" ] ||
            { log "FAIL: pod-1-$p holds $held after kill -9, was $(cat "$LAB/n1/pod-$p.ip")"; return 1; }
    done
    log "ok: kill -9 and restart keeps every pod address"
    eventually "connectivity after the restart" all_pods_reach_all "$n"

    for i in 1 2; do
        ping_through_restart "$i" "$n" || return 1
        eventually "connectivity after restarting node$i's agent" all_pods_reach_all "$n"
    done

    for j in $(seq 2 "$n"); do cut_link 1 "$j"; done
    sleep 8
    for j in $(seq 2 "$n"); do heal_link 1 "$j"; done
    eventually "a partition heals" all_pods_reach_all "$n"
    log "all lab checks passed"
}

# Sourced (ci/doctor-lab.sh), it only defines the functions above.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case "${1:-}" in
up) up "${2:-3}" ;;
down) down ;;
test) test_lab "${2:-3}" ;;
*)
    echo "usage: $0 up [N] | test [N] | down" >&2
    exit 2
    ;;
esac
