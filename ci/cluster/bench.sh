# shellcheck shell=bash
# `ci/cluster.sh bench`: measurements on a fresh cluster, printed, never
# asserted. Sourced by ci/cluster.sh.
#   1. seconds from `kubectl apply -f deploy/weft.yaml` to every node Ready
#      and a 30-pod Deployment spread over the nodes all Running;
#   2. pod network setup latency: containerd's RunPodSandbox time (from its
#      log: request to sandbox id, which spans the CNI ADD) for 60 pods with
#      weft, then for 60 pods with the reference bridge + host-local plugins
#      on the same nodes, p50/p99 and the ratio;
#   3. idle CPU and memory of each node's weft agent next to its kubelet.

deployment() { # NAME REPLICAS (in namespace NAME)
  kc create namespace "$1" >/dev/null
  kc -n "$1" apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: $1}
spec:
  replicas: $2
  selector: {matchLabels: {app: $1}}
  template:
    metadata: {labels: {app: $1}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway,
         labelSelector: {matchLabels: {app: $1}}}
      containers:
      - {name: c, image: busybox:1.28, command: [sleep, "86400"]}
EOF
}

all_running() { # NAME COUNT
  [ "$(kc -n "$1" get pods -l "app=$1" --field-selector=status.phase=Running -o name | wc -l)" -ge "$2" ]
}

# Sandbox setup times (ms) of the pods of namespace NS, from every node's
# containerd log.
sandbox_ms() {
  local ns=$1
  cat "$CLUSTER_DIR"/machines/node*/logs/containerd.log | python3 -c '
import re, sys
from datetime import datetime
ns = sys.argv[1]
start, times = {}, []
pat = re.compile(r"time=\"([^\"]+)\".*RunPodSandbox for &PodSandboxMetadata\{Name:([^,]+),Uid:([^,]+),Namespace:([^,]+),")
for line in sys.stdin:
    m = pat.search(line)
    if not m or m.group(4) != ns:
        continue
    t = datetime.fromisoformat(m.group(1)[:26]).timestamp()
    key = m.group(3)
    if "returns sandbox id" in line:
        if key in start:
            times.append((t - start.pop(key)) * 1000)
    else:
        start[key] = t
for v in sorted(times):
    print("%.1f" % v)
' "$ns"
}

percentiles() { # reads numbers, prints "n=N p50=X p99=Y"
  python3 -c '
import sys
v = sorted(float(x) for x in sys.stdin if x.strip())
if not v:
    print("n=0"); sys.exit(0)
q = lambda p: v[min(len(v) - 1, int(round(p * (len(v) - 1))))]
print("n=%d p50=%.1f p99=%.1f" % (len(v), q(0.5), q(0.99)))'
}

# Replaces weft by the reference plugins on every node: bridge cni0 with a
# host-local /24 per node (no cross-node routes: only setup time matters).
use_reference_plugins() {
  local node i=0
  kc delete -f - <"$ROOT/deploy/weft.yaml" --wait=true >/dev/null
  wait_for 60 "weft pods gone" no_weft_pods
  for node in $(nodes); do
    i=$((i + 1))
    uninstall_node "$node"
    in_machine "$node" sh -c "cat >/etc/cni/net.d/10-reference.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "reference", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.$i.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  done
}

# CPU seconds (user+system) and resident MiB of a process.
proc_cpu() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }
proc_rss() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

# The pid of the weft agent (`weft router`) running in NODE's network namespace.
weft_agent_pid() {
  local netns p
  netns=$(readlink "/proc/$(holder_pid "$1")/ns/net")
  for p in $(pgrep -x weft); do
    [ "$(readlink "/proc/$p/ns/net")" = "$netns" ] && grep -q router "/proc/$p/cmdline" && { echo "$p"; return 0; }
  done
  return 1
}

idle_usage() {
  local node w k c0w c0k c1w c1k secs=30
  declare -A pw pk
  for node in $(nodes); do
    pw[$node]=$(weft_agent_pid "$node")
    pk[$node]=$(proc_pid "$node" kubelet)
    eval "c0w_$node=$(proc_cpu "${pw[$node]}"); c0k_$node=$(proc_cpu "${pk[$node]}")"
  done
  sleep "$secs"
  echo "idle over ${secs} s: CPU (% of one core) and resident memory"
  for node in $(nodes); do
    w=${pw[$node]}
    k=${pk[$node]}
    c1w=$(proc_cpu "$w")
    c1k=$(proc_cpu "$k")
    eval "c0w=\$c0w_$node; c0k=\$c0k_$node"
    awk -v n="$node" -v a="$c0w" -v b="$c1w" -v c="$c0k" -v d="$c1k" -v s="$secs" \
      -v rw="$(proc_rss "$w")" -v rk="$(proc_rss "$k")" \
      'BEGIN { printf "  %s  weft %.2f%% %s MiB   kubelet %.2f%% %s MiB\n", n, (b - a) * 100 / s, rw, (d - c) * 100 / s, rk }'
  done
}

run_bench() {
  local n=${1:-3} t weft ref
  build
  down
  trap 'down' EXIT
  INSTALL_WEFT=0 up "$n"
  t=$(now)
  apply_weft >/dev/null
  wait_for 300 "nodes Ready" nodes_ready "$n"
  deployment bench-spread 30
  wait_for 300 "30 pods Running" all_running bench-spread 30
  echo "apply -> $n nodes Ready and a 30-pod Deployment Running: $(since "$t") s"
  idle_usage
  kc delete namespace bench-spread --wait=true >/dev/null
  deployment bench-weft 60
  wait_for 300 "60 pods Running (weft)" all_running bench-weft 60
  weft=$(sandbox_ms bench-weft | percentiles)
  kc delete namespace bench-weft --wait=true >/dev/null
  use_reference_plugins
  deployment bench-reference 60
  wait_for 300 "60 pods Running (reference)" all_running bench-reference 60
  ref=$(sandbox_ms bench-reference | percentiles)
  echo "pod network setup (containerd RunPodSandbox, ms): weft $weft; reference bridge+host-local $ref"
  awk -v w="$weft" -v r="$ref" 'BEGIN {
    split(w, a, /[ =]/); split(r, b, /[ =]/)
    printf "ratio weft/reference: p50 %.2fx, p99 %.2fx (goal <= 1.0x)\n", a[4] / b[4], a[6] / b[6] }'
}
