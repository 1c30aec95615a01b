#!/usr/bin/env bash
# weft's Kubernetes tests against a real kube-apiserver (ci/kube-apiserver.sh):
# build the server (cached after the first time), start it, run the weft-kube
# integration tests (kube/tests/apiserver.rs) and the agent's
# (node/tests/kube.rs: `weft router --kube`) with the admin and weft
# kubeconfigs, check that the server accepts deploy/weft.yaml
# (kubectl apply --dry-run=server), and always stop the server again.
#
#   bash ci/kube-test.sh [extra cargo test args]
#
# Env: KUBE_TEST_DIR (default /tmp/weft-kube) holds the server's state.
# Needs root (apt, etcd) like ci/kube-apiserver.sh; kubectl comes with `build`.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${KUBE_TEST_DIR:-/tmp/weft-kube}
KUBE="bash ci/kube-apiserver.sh"

$KUBE build
trap '$KUBE down "$DIR"' EXIT
$KUBE up "$DIR"

echo "== kubectl apply --dry-run=server -f deploy/weft.yaml"
# A dry run creates nothing, so the objects in weft's own namespace need it
# to exist already.
kubectl --kubeconfig "$DIR/admin.kubeconfig" create namespace weft
kubectl --kubeconfig "$DIR/admin.kubeconfig" apply --dry-run=server -f deploy/weft.yaml

echo "== weft-kube against kube-apiserver"
WEFT_KUBE_TESTS=1 \
    KUBECONFIG_ADMIN="$DIR/admin.kubeconfig" \
    KUBECONFIG_WEFT="$DIR/weft.kubeconfig" \
    cargo test -p weft-kube --test apiserver "$@" -- --test-threads=1

# One at a time: one of them stops and restarts the API server.
echo "== weft router --kube: agents on loopback (ring and node-cidr modes)"
kubectl --kubeconfig "$DIR/admin.kubeconfig" apply -f deploy/weft.yaml 2>&1 >/dev/null |
    grep -v 'last-applied-configuration' >&2 || true
WEFT_KUBE_TESTS=1 \
    KUBECONFIG_ADMIN="$DIR/admin.kubeconfig" \
    KUBECONFIG_WEFT="$DIR/weft.kubeconfig" \
    cargo test -p weft --test kube "$@" -- --test-threads=1
