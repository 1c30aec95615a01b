#!/usr/bin/env bash
# CNI plugin latency, as a runtime sees it: COUNT sequential ADDs, then COUNT
# DELs, each pod in its own fresh network namespace, for
#   weft       weft-cni against a weft agent (`weft router`, fastdp) running
#              in a node namespace, and
#   reference  Debian's /usr/lib/cni/bridge with host-local IPAM
# in the same run, with the same harness. Prints p50/p90/p99/max/mean per
# plugin and command, the exec floor (VERSION), and weft/reference ratios
# against the goals (ADD p50 <= 0.5x reference, ADD and DEL p99 <= 20 ms).
#
#   bash ci/bench-cni.sh
#
# Env: COUNT (200), PLUGINS ("reference weft": which, in this order),
# CNI_VERSION (1.0.0, the conf version both get), WEFT_BIN
# (target/debug/weft), WEFT_CNI_BIN (weft-cni beside it), CONFLIST (the weft
# plugin's settings come from its weft-cni entry; default
# deploy/10-weft.conflist), ENFORCE=1 to exit non-zero when a goal is
# missed (off by default: 2 vCPUs shared with anything else running are
# noisy), JSON=path to also write the raw timings and the summary.
#
# Method (as in shared/reference/limits.md): a bash loop inside the node
# ("host") namespace execs the plugin with CNI_COMMAND/CNI_CONTAINERID/
# CNI_NETNS/CNI_IFNAME/CNI_PATH and the config on stdin, timing the fork+exec
# +wait with $EPOCHREALTIME (so `ip netns exec` is not timed, the fork is, as a
# runtime pays it). Namespaces are created before and deleted after the timed
# loops. DEL gets the ADD result as prevResult, as libcni passes it. Every
# invocation must exit 0 and every ADD must return an address, else the run
# fails. Takes ~1 min at COUNT=200.
#
# Needs root, iproute2, python3, and containernetworking-plugins (bash
# ci/cnitool.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C

COUNT=${COUNT:-200}
PLUGINS=${PLUGINS:-reference weft}
CNI_VERSION=${CNI_VERSION:-1.0.0}
BIN=${WEFT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/weft}
CNI_BIN=${WEFT_CNI_BIN:-$(dirname "$BIN")/weft-cni}
CONFLIST=${CONFLIST:-$PWD/deploy/10-weft.conflist}
REF_DIR=/usr/lib/cni

P=wcb$$
T=$(mktemp -d /tmp/weft-bench-cni.XXXXXX)
IPAM_DIR=/run/weft-bench-cni.$$
AGENT_PID=

log() { echo "bench-cni: $*" >&2; }
fail() {
    log "FAIL: $*"
    exit 1
}

cleanup() {
    local rc=$?
    set +e
    if [ -n "$AGENT_PID" ]; then
        kill "$AGENT_PID" 2>/dev/null
        wait "$AGENT_PID" 2>/dev/null
    fi
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
        ip netns del "$ns" 2>/dev/null
    done
    if [ $rc -ne 0 ] && [ -f "$T/agent.log" ]; then
        log "last agent log lines:"
        tail -n 20 "$T/agent.log" >&2
    fi
    rm -rf "$T" "$IPAM_DIR"
    return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || fail "needs root (network namespaces)"
[[ "$COUNT" =~ ^[1-9][0-9]*$ ]] || fail "COUNT must be a positive integer"
for p in $PLUGINS; do
    case $p in
    reference)
        [ -x "$REF_DIR/bridge" ] && [ -x "$REF_DIR/host-local" ] ||
            fail "no $REF_DIR/bridge or host-local (bash ci/cnitool.sh installs containernetworking-plugins)"
        ;;
    weft)
        [ -x "$BIN" ] || fail "no agent binary $BIN (cargo build -p weft)"
        [ -x "$CNI_BIN" ] || fail "no plugin $CNI_BIN (cargo build -p weft-cni)"
        ;;
    *) fail "unknown plugin '$p' in PLUGINS (reference, weft)" ;;
    esac
done

wait_for() {
    local what=$1
    shift
    for _ in $(seq 1 100); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    fail "timed out waiting for $what"
}

# The timed loop, run inside the node namespace. One line per invocation:
# CMD index rc start end.
cat >"$T/loop.sh" <<'EOF'
# loop.sh CMD PLUGIN CNI_PATH PREFIX COUNT DIR
cmd=$1 plugin=$2 path=$3 prefix=$4 n=$5 dir=$6
lc=$(echo "$cmd" | tr A-Z a-z)
for ((i = 1; i <= n; i++)); do
    case $cmd in
    ADD) conf=$dir/conf.json ;;
    DEL) conf=$dir/del.$i.json ;;
    VERSION) conf=$dir/conf.json ;;
    esac
    t0=$EPOCHREALTIME
    CNI_COMMAND=$cmd CNI_CONTAINERID=$prefix-$i CNI_NETNS=/var/run/netns/$prefix-$i \
        CNI_IFNAME=eth0 CNI_PATH=$path "$plugin" <"$conf" >"$dir/$lc.$i.out" 2>"$dir/$lc.$i.err"
    rc=$?
    t1=$EPOCHREALTIME
    echo "$cmd $i $rc $t0 $t1"
done
EOF

setup_reference() { # -> NODE, PLUGIN, CNIPATH, conf.json in $1
    local d=$1
    NODE=$P-refhost
    ip netns add "$NODE"
    ip -n "$NODE" link set lo up
    PLUGIN=$REF_DIR/bridge
    CNIPATH=$REF_DIR
    BRIDGE=cnib0
    cat >"$d/conf.json" <<EOF
{"cniVersion":"$CNI_VERSION","name":"cnib","type":"bridge","bridge":"$BRIDGE","isGateway":true,"ipMasq":false,
 "ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"$IPAM_DIR"}}
EOF
}

setup_weft() {
    local d=$1
    NODE=$P-node
    local under=$P-under
    ip netns add "$NODE"
    ip -n "$NODE" link set lo up
    ip netns add "$under"
    ip -n "$under" link add ul type bridge
    ip -n "$under" link set ul up
    ip -n "$NODE" link add eth0 type veth peer name u1 netns "$under"
    ip -n "$under" link set u1 master ul up
    ip -n "$NODE" addr add 192.168.1.11/24 dev eth0
    ip -n "$NODE" link set eth0 up
    ip netns exec "$NODE" "$BIN" router --name node1 --listen 192.168.1.11:6783 \
        --ipalloc-init consensus=1 --datapath fastdp \
        --data-dir "$T/agent-data" --socket "$T/weft.sock" >>"$T/agent.log" 2>&1 &
    AGENT_PID=$!
    wait_for "the agent's socket" test -S "$T/weft.sock"
    wait_for "bridge weft in the node" ip -n "$NODE" link show weft
    kill -0 "$AGENT_PID" 2>/dev/null || fail "the agent exited"
    PLUGIN=$CNI_BIN
    CNIPATH="$(dirname "$CNI_BIN"):$REF_DIR"
    BRIDGE=weft
    # The weft-cni entry of the deployed conflist, with this run's socket
    # and log file.
    python3 - "$CONFLIST" "$d/conf.json" "$CNI_VERSION" "$T/weft.sock" "$T/weft-cni.log" <<'EOF'
import json, os, sys
src, dst, ver, sock, logf = sys.argv[1:6]
entry = {"type": "weft-cni"}
if os.path.exists(src):
    entry = next(p for p in json.load(open(src))["plugins"] if p["type"] == "weft-cni")
entry = dict(entry, cniVersion=ver, name="weft", socket=sock)
if "logFile" in entry:
    entry["logFile"] = logf
json.dump(entry, open(dst, "w"))
EOF
    # The agent answers once its ring is seeded: one untimed warm-up pod.
    ip netns add "$P-warm"
    local i
    for i in $(seq 1 50); do
        ip netns exec "$NODE" env CNI_COMMAND=ADD CNI_CONTAINERID=$P-warm CNI_NETNS=/var/run/netns/$P-warm \
            CNI_IFNAME=eth0 CNI_PATH="$CNIPATH" "$PLUGIN" <"$d/conf.json" >"$T/warm.out" 2>&1 && break
        sleep 0.2
    done
    grep -q '"ips"' "$T/warm.out" || fail "weft-cni warm-up ADD failed: $(cat "$T/warm.out")"
    ip netns exec "$NODE" env CNI_COMMAND=DEL CNI_CONTAINERID=$P-warm CNI_NETNS=/var/run/netns/$P-warm \
        CNI_IFNAME=eth0 CNI_PATH="$CNIPATH" "$PLUGIN" <"$d/conf.json" >"$T/warm.out" 2>&1 ||
        fail "weft-cni warm-up DEL failed: $(cat "$T/warm.out")"
    ip netns del "$P-warm"
}

teardown_node() {
    if [ -n "$AGENT_PID" ]; then
        kill "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
        AGENT_PID=
    fi
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
        ip netns del "$ns" 2>/dev/null || true
    done
}

bridge_ports() { ip -n "$NODE" -o link show master "$BRIDGE" 2>/dev/null | grep -c . || true; }

run_plugin() {
    local name=$1 d=$T/$1 pre=$P-$1
    mkdir -p "$d"
    "setup_$name" "$d"
    log "$name: $PLUGIN, $COUNT pods (cniVersion $CNI_VERSION)"
    for i in $(seq 1 "$COUNT"); do ip netns add "$pre-$i"; done

    ip netns exec "$NODE" bash "$T/loop.sh" ADD "$PLUGIN" "$CNIPATH" "$pre" "$COUNT" "$d" >"$d/times"
    # Untimed: every ADD gave an address, and DEL's configs carry it.
    python3 - "$d" "$COUNT" <<'EOF' || fail "$name: bad ADD results (above)"
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
conf = json.load(open(f"{d}/conf.json"))
bad = 0
for i in range(1, n + 1):
    try:
        r = json.load(open(f"{d}/add.{i}.out"))
        assert r.get("ips"), "no ips"
    except Exception as e:
        bad += 1
        if bad <= 3:
            print(f"ADD {i}: {e}: {open(f'{d}/add.{i}.out').read()[:300]} {open(f'{d}/add.{i}.err').read()[:300]}", file=sys.stderr)
        r = None
    json.dump(dict(conf, prevResult=r) if r else conf, open(f"{d}/del.{i}.json", "w"))
sys.exit(1 if bad else 0)
EOF
    local ports
    ports=$(bridge_ports)
    [ "$ports" = "$COUNT" ] || fail "$name: $ports ports on bridge $BRIDGE after $COUNT ADDs"
    ip -n "$pre-1" -o -4 addr show dev eth0 | grep -q inet || fail "$name: pod 1 has no IPv4 address on eth0"
    ip -n "$pre-$COUNT" -o -4 addr show dev eth0 | grep -q inet || fail "$name: pod $COUNT has no IPv4 address on eth0"

    ip netns exec "$NODE" bash "$T/loop.sh" DEL "$PLUGIN" "$CNIPATH" "$pre" "$COUNT" "$d" >>"$d/times"
    # weft's agent deletes host veths in the background after DEL: give
    # the kernel a few seconds to finish before checking.
    for _ in $(seq 1 100); do
        ports=$(bridge_ports)
        [ "$ports" = 0 ] && break
        sleep 0.1
    done
    [ "$ports" = 0 ] || fail "$name: $ports ports left on bridge $BRIDGE after $COUNT DELs"
    ip netns exec "$NODE" bash "$T/loop.sh" VERSION "$PLUGIN" "$CNIPATH" "$pre" "$COUNT" "$d" >>"$d/times"
    awk -v n="$name" '{print n, $0}' "$d/times" >>"$T/all-times"
    teardown_node
}

for p in $PLUGINS; do run_plugin "$p"; done

python3 - "$T/all-times" "$T" "${JSON:-}" "${ENFORCE:-0}" "$COUNT" <<'EOF'
import json, sys
path, tdir, out, enforce, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
runs = {}
failed = []
for line in open(path):
    plugin, cmd, i, rc, t0, t1 = line.split()
    runs.setdefault((plugin, cmd), []).append((float(t1) - float(t0)) * 1000)
    if rc != "0":
        failed.append((plugin, cmd, i, rc))

def pct(xs, q):  # nearest-rank percentile
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(-(-q * len(xs) // 100)) - 1))
    return xs[k]

summary = {}
print(f"{'plugin':<10} {'cmd':<8} {'n':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
for (plugin, cmd), xs in runs.items():
    s = dict(n=len(xs), p50=pct(xs, 50), p90=pct(xs, 90), p99=pct(xs, 99), max=max(xs), mean=sum(xs) / len(xs))
    summary[f"{plugin}/{cmd}"] = s
    print(f"{plugin:<10} {cmd:<8} {s['n']:>4} {s['p50']:>8.2f} {s['p90']:>8.2f} {s['p99']:>8.2f} {s['max']:>8.2f} {s['mean']:>8.2f}")

missed = []
if "weft/ADD" in summary and "reference/ADD" in summary:
    print("\nweft / reference:")
    for cmd in ("ADD", "DEL"):
        w, r = summary[f"weft/{cmd}"], summary[f"reference/{cmd}"]
        print(f"  {cmd}: p50 {w['p50'] / r['p50']:.2f}x ({w['p50']:.2f} vs {r['p50']:.2f} ms), "
              f"p99 {w['p99'] / r['p99']:.2f}x ({w['p99']:.2f} vs {r['p99']:.2f} ms)")
    ratio = summary["weft/ADD"]["p50"] / summary["reference/ADD"]["p50"]
    ok = ratio <= 0.5
    print(f"goal ADD p50 <= 0.5x reference: {ratio:.2f}x {'met' if ok else 'MISSED'}")
    if not ok:
        missed.append("ADD p50 ratio")
if "weft/ADD" in summary:
    for cmd in ("ADD", "DEL"):
        p99 = summary[f"weft/{cmd}"]["p99"]
        ok = p99 <= 20
        print(f"goal weft {cmd} p99 <= 20 ms: {p99:.2f} ms {'met' if ok else 'MISSED'}")
        if not ok:
            missed.append(f"{cmd} p99")

if out:
    json.dump({"count": count, "summary": summary, "failed": failed,
               "raw_ms": {f"{p}/{c}": xs for (p, c), xs in runs.items()}}, open(out, "w"), indent=1)
if failed:
    for plugin, cmd, i, rc in failed[:5]:
        d = f"{tdir}/{plugin}"
        lc = cmd.lower()
        print(f"FAIL: {plugin} {cmd} pod {i} exited {rc}: "
              f"{open(f'{d}/{lc}.{i}.out').read()[:300]} {open(f'{d}/{lc}.{i}.err').read()[:300]}", file=sys.stderr)
    print(f"FAIL: {len(failed)} invocations failed", file=sys.stderr)
    sys.exit(1)
if missed and enforce:
    print(f"FAIL (ENFORCE=1): missed {', '.join(missed)}", file=sys.stderr)
    sys.exit(1)
EOF
