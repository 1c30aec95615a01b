#!/usr/bin/env bash
# deploy/monitoring against the real tools and a real agent:
#   - promtool (Debian's prometheus package) checks weft.rules.yaml and runs
#     its unit tests (weft.rules.test.yaml): every alert fires when it
#     should and not on a healthy node;
#   - prometheusrule.yaml (the operator's wrapper) holds the same groups;
#   - every weft_* metric the rules and the Grafana dashboard name is one an
#     agent serves: an agent with a sleeve, in a network namespace of its
#     own, is scraped on --metrics-addr (which must not serve /status).
#
#   bash ci/monitoring-test.sh            (as root: apt, a netns, a TUN device)
#   bash ci/monitoring-test.sh --write    regenerate prometheusrule.yaml
# Env: WEFT_BIN (default target/debug/weft, under CARGO_TARGET_DIR if set).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=deploy/monitoring

# The PrometheusRule for the operator: weft.rules.yaml's groups under spec.
prometheus_rule() {
    cat <<'HEAD'
# Generated from weft.rules.yaml by `bash ci/monitoring-test.sh --write`
# (CI fails when the two differ). For the Prometheus operator.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: weft
  namespace: kube-system
  labels:
    app.kubernetes.io/name: weft
spec:
HEAD
    grep -v '^#' "$DIR/weft.rules.yaml" | sed 's/^/  /'
}

if [ "${1:-}" = --write ]; then
    prometheus_rule >"$DIR/prometheusrule.yaml"
    exit 0
fi

command -v promtool >/dev/null || {
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
}
echo "== promtool check rules / test rules"
promtool check rules "$DIR/weft.rules.yaml"
(cd "$DIR" && promtool test rules weft.rules.test.yaml)

echo "== prometheusrule.yaml is weft.rules.yaml"
diff <(prometheus_rule) "$DIR/prometheusrule.yaml" ||
    { echo "prometheusrule.yaml is stale: bash ci/monitoring-test.sh --write" >&2; exit 1; }

echo "== every metric the rules and the dashboard name is served"
BIN=${WEFT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/weft}
[ -x "$BIN" ] || cargo build -q -p weft
NS=weft-monitoring-$$
TMP=$(mktemp -d)
cleanup() {
    [ -f "$TMP/pid" ] && kill "$(cat "$TMP/pid")" 2>/dev/null
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" addr add 192.168.99.1/32 dev lo
ip netns exec "$NS" "$BIN" router --name monitoring --datapath sleeve \
    --ipalloc-init consensus=1 --listen 192.168.99.1:6783 \
    --metrics-addr 192.168.99.1:6782 --data-dir "$TMP/data" --socket "$TMP/weft.sock" \
    >"$TMP/agent.log" 2>&1 &
echo $! >"$TMP/pid"
scrape() { ip netns exec "$NS" python3 - "$1" <<'PY'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen("http://192.168.99.1:6782" + sys.argv[1], timeout=2) as r:
        sys.stdout.write(f"{r.status}\n" + r.read().decode())
except urllib.error.HTTPError as e:
    sys.stdout.write(f"{e.code}\n")
except OSError:
    sys.stdout.write("0\n")
PY
}
for _ in $(seq 1 100); do
    [ "$(scrape /readyz | head -1)" = 200 ] && break
    sleep 0.1
done
# A stray datagram, so the refusals by reason have a series.
ip netns exec "$NS" python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"stray", ("192.168.99.1", 6783))'
sleep 0.2
scrape /metrics >"$TMP/metrics"
[ "$(head -1 "$TMP/metrics")" = 200 ] || { cat "$TMP/agent.log" >&2; echo "no /metrics on --metrics-addr" >&2; exit 1; }
[ "$(scrape /status | head -1)" = 404 ] || { echo "--metrics-addr serves /status" >&2; exit 1; }
python3 - "$TMP/metrics" "$DIR/weft.rules.yaml" "$DIR/grafana-dashboard.json" <<'PY'
import json, re, sys
served = {l.split("{")[0].split(" ")[0] for l in open(sys.argv[1]) if l.startswith("weft_")}
rules = open(sys.argv[2]).read()
named = set(re.findall(r"\bweft_[a-z_]+\b(?![a-z_(|])", rules))
# `{__name__=~"weft_(datagrams|sleeve)_dropped_total"}`: each alternative.
for m in re.finditer(r"(weft_[a-z_]*)\(([a-z_|]+)\)([a-z_]*)", rules):
    named |= {m.group(1) + alt + m.group(3) for alt in m.group(2).split("|")}
dashboard = json.load(open(sys.argv[3]))
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        named |= set(re.findall(r"\bweft_[a-z_]+\b", target["expr"]))
missing = sorted(named - served)
print(f"{len(named)} metrics named, {len(served)} served")
sys.stdout.flush()
if missing:
    sys.exit("named but not served: " + ", ".join(missing))
PY
echo "monitoring: ok"
