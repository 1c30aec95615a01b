#!/usr/bin/env bash
# Pod-to-pod throughput across nodes of the netns lab, against plain
# routing between the same two pods (host routes via the peer node's
# underlay address, no encapsulation), measured in the same run: iperf3, one TCP stream, server and
# client pinned to different CPUs (-A), RUNS runs of SECONDS each, plain and
# overlay alternating, medians.
# Goals: fastdp >= 0.90x plain; sleeve >= 0.25x plain.
#
#   bash ci/bench-dataplane.sh [fastdp|sleeve ...]   (default: fastdp sleeve)
#   RUNS=3 SECONDS_PER_RUN=5 WEFT_PASSWORD=... (also measures sealed sleeve)
#   WEFT_BIN=/path/to/weft (weft-cni beside it; default: a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v iperf3 >/dev/null || { apt-get update -q >/dev/null; apt-get install -y -q iperf3 >/dev/null; }
# WEFT_BIN (and weft-cni beside it): binaries to measure instead of a
# fresh release build, e.g. an older commit's, for a side-by-side run.
if [ -z "${WEFT_BIN:-}" ]; then
    cargo build --release -q -p weft -p weft-cni
    export WEFT_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/weft
fi
RUNS=${RUNS:-3}
T=${SECONDS_PER_RUN:-5}
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(fastdp sleeve)
trap 'bash ci/lab.sh down >/dev/null 2>&1' EXIT

# Gbit/s of one iperf3 run: server in namespace $1, client in $2.
run_once() {
    local server=$1 client=$2 dst=$3 gbits
    ip netns exec "$server" iperf3 -s -1 -A 1 >/dev/null 2>&1 &
    sleep 0.5
    gbits=$(ip netns exec "$client" iperf3 -c "$dst" -t "$T" -A 0 -J |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
    wait
    echo "$gbits"
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-22s %10s %8s\n' "path" "Gbit/s" "ratio"
for mode in "${MODES[@]}"; do
    DATAPATH=$mode bash ci/lab.sh up 2 >/dev/null 2>&1
    sleep 2
    pod1=$(cat /tmp/weftlab-wl/n1/pod-1.ip)
    pod=$(cat /tmp/weftlab-wl/n2/pod-1.ip)
    plain=() overlay=()
    # Plain and overlay runs alternate, so a machine that slows down (or
    # speeds up) during the benchmark affects both alike.
    for _ in $(seq 1 "$RUNS"); do
        # Plain routing: /32 routes over the underlay beat weft's overlay routes.
        ip -n wl-n1 route add "$pod/32" via 192.168.1.12 dev eth0
        ip -n wl-n2 route add "$pod1/32" via 192.168.1.11 dev eth0
        plain+=("$(run_once wl-n2-p1 wl-n1-p1 "$pod")")
        ip -n wl-n1 route del "$pod/32" via 192.168.1.12 dev eth0
        ip -n wl-n2 route del "$pod1/32" via 192.168.1.11 dev eth0
        overlay+=("$(run_once wl-n2-p1 wl-n1-p1 "$pod")")
    done
    plain=$(printf '%s\n' "${plain[@]}" | median)
    overlay=$(printf '%s\n' "${overlay[@]}" | median)
    label=$mode
    [ -n "${WEFT_PASSWORD:-}" ] && label="$mode (secret)"
    printf '%-22s %10.2f %8s\n' "plain (same run)" "$plain" "1.00x"
    printf '%-22s %10.2f %8s\n' "$label" "$overlay" "$(python3 -c "print(f'{$overlay/$plain:.2f}x')")"
    bash ci/lab.sh down >/dev/null 2>&1
done
