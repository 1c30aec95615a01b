#!/usr/bin/env bash
# Gossip at start-up: N agents (`--datapath none`, control plane only) on
# loopback ports, each told only about agent 1, so every other peer is
# learnt by gossip. Measures the wall time from the first start until every
# agent lists all N peers as reachable, and the control bytes all agents
# sent until then (weft_gossip_bytes_total{direction="out"}).
# Reference (../shared/reference): Weave's mesh took a median of 71 s and
# moved 504 MB for 60 peers on this machine. Goal: <= 2 s and <= 5 MB.
#
#   bash ci/bench-gossip.sh [SIZES...]     (default: 10 30 60)
#   RUNS=3 (runs per size, median printed), WEFT_BIN (target/release/weft)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "${WEFT_BIN:-${CARGO_TARGET_DIR:-target}/release/weft}" ] || cargo build --release -q -p weft
BIN=${WEFT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/weft}
RUNS=${RUNS:-3}
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(10 30 60)

python3 - "$BIN" "$RUNS" "${SIZES[@]}" <<'EOF'
import json, os, shutil, signal, statistics, subprocess, sys, tempfile, time, urllib.request

binary, runs, sizes = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3:]]

def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
        return r.read().decode()

def run(n):
    tmp = tempfile.mkdtemp(prefix="weft-gossip-")
    procs = []
    try:
        start = time.monotonic()
        for i in range(n):
            args = [binary, "router", "--name", f"a{i}", "--datapath", "none",
                    "--listen", f"127.0.0.1:{17000 + i}", "--status-addr", f"127.0.0.1:{18000 + i}",
                    "--ipalloc-init", f"consensus={n}", "--data-dir", f"{tmp}/{i}",
                    "--socket", f"{tmp}/{i}.sock"]
            if i > 0:
                args += ["--peer", "127.0.0.1:17000"]
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env={k: v for k, v in os.environ.items() if k != "WEFT_PASSWORD"}))
        done = [False] * n
        while not all(done):
            if time.monotonic() - start > 120:
                return None, None
            for i in range(n):
                if done[i]:
                    continue
                try:
                    peers = json.loads(get(18000 + i, "/status/peers"))
                    done[i] = len(peers) == n and all(p["reachable"] for p in peers)
                except Exception:
                    pass
            time.sleep(0.05)
        seconds = time.monotonic() - start
        total = 0
        for i in range(n):
            for line in get(18000 + i, "/metrics").splitlines():
                if line.startswith('weft_gossip_bytes_total{direction="out"}'):
                    total += int(float(line.split()[-1]))
        return seconds, total
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

print(f"{'agents':>6} {'seconds':>8} {'MB':>8}   (median of {runs}; goal at 60: <= 2 s, <= 5 MB; Weave mesh at 60: 71 s, 504 MB)")
for n in sizes:
    results = [run(n) for _ in range(runs)]
    ok = [r for r in results if r[0] is not None]
    if not ok:
        print(f"{n:>6}  did not converge within 120 s")
        continue
    s = statistics.median(r[0] for r in ok)
    b = statistics.median(r[1] for r in ok)
    print(f"{n:>6} {s:>8.2f} {b / 1e6:>8.2f}")
EOF
