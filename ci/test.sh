#!/usr/bin/env bash
# The project's test command (README: "Run the tests"): every crate's tests,
# then, as root, the netns lab (real agents, kernel VXLAN and the sleeve,
# pods pinging), and the Kubernetes tests against a real kube-apiserver
# (built from Debian's source once, cached in ~/.cache/weft), and a real
# three-node Kubernetes cluster with weft as its DaemonSet: the tutorial's
# checklist and the upstream network conformance tests (ci/cluster.sh ci).
# WEFT_SKIP_LAB=1 skips the lab; WEFT_SKIP_KUBE=1 the API server tests and
# the cluster; WEFT_SKIP_CLUSTER=1 only the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
if [ "$(id -u)" != 0 ] || [ "${WEFT_SKIP_LAB:-0}" = 1 ]; then
    echo "== netns lab skipped (needs root; WEFT_SKIP_LAB=${WEFT_SKIP_LAB:-0})"
    exit 0
fi
cargo build --locked -p weft -p weft-cni
echo "== netns lab: fastdp"
bash ci/lab.sh test 3
echo "== netns lab: fastdp, encrypted control plane"
WEFT_PASSWORD=lab-secret bash ci/lab.sh test 3
echo "== netns lab: sleeve"
DATAPATH=sleeve bash ci/lab.sh test 3
echo "== netns lab: sleeve, encrypted"
DATAPATH=sleeve WEFT_PASSWORD=lab-secret bash ci/lab.sh test 3
echo "== weft doctor in the netns lab: healthy, then each failure for its real cause"
bash ci/doctor-lab.sh
echo "== monitoring: alert rules and their tests (promtool), the metrics they name are served"
bash ci/monitoring-test.sh
echo "== CNI chain through libcni (cnitool): weft-cni, portmap, loopback"
bash ci/cnitool.sh >/dev/null
bash ci/cni-chain.sh weft
if [ "${WEFT_SKIP_KUBE:-0}" = 1 ]; then
    echo "== Kubernetes tests skipped (WEFT_SKIP_KUBE=1)"
else
    echo "== Kubernetes: weft-kube and weft router --kube against kube-apiserver"
    bash ci/kube-test.sh
    if [ "${WEFT_SKIP_CLUSTER:-0}" = 1 ]; then
        echo "== real cluster skipped (WEFT_SKIP_CLUSTER=1)"
    else
        echo "== real cluster: weft as a DaemonSet, the tutorial's checklist, upstream conformance"
        bash ci/cluster.sh ci
    fi
fi
