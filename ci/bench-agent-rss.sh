#!/usr/bin/env bash
# Agent footprint: N agents (`--datapath none`) on loopback, fully peered
# through gossip; after they converge and idle WAIT seconds, each agent's
# resident memory (VmRSS) and CPU over a 10 s window. Goal: RSS <= 30 MiB.
#
#   bash ci/bench-agent-rss.sh [SIZES...]   (default: 3 50); WEFT_BIN
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "${WEFT_BIN:-${CARGO_TARGET_DIR:-target}/release/weft}" ] || cargo build --release -q -p weft
BIN=${WEFT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/weft}
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(3 50)

python3 - "$BIN" "${WAIT:-10}" "${SIZES[@]}" <<'EOF2'
import os, shutil, signal, statistics, subprocess, sys, tempfile, time
binary, wait, sizes = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3:]]
tick = os.sysconf("SC_CLK_TCK")
def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
print(f"{'agents':>6} {'RSS MiB median':>15} {'max':>6} {'idle CPU % median':>18} {'max':>6}")
for n in sizes:
    tmp = tempfile.mkdtemp(prefix="weft-rss-")
    procs = []
    try:
        for i in range(n):
            args = [binary, "router", "--name", f"a{i}", "--datapath", "none",
                    "--listen", f"127.0.0.1:{17000 + i}", "--status-addr", f"127.0.0.1:{18000 + i}",
                    "--ipalloc-init", f"consensus={n}", "--data-dir", f"{tmp}/{i}", "--socket", f"{tmp}/{i}.sock"]
            if i > 0:
                args += ["--peer", "127.0.0.1:17000"]
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(5 + wait)
        before = [cpu(p.pid) for p in procs]
        time.sleep(10)
        after = [cpu(p.pid) for p in procs]
        rs = [rss(p.pid) for p in procs]
        cp = [100 * (a - b) / 10 for a, b in zip(after, before)]
        print(f"{n:>6} {statistics.median(rs):>15.1f} {max(rs):>6.1f} {statistics.median(cp):>18.2f} {max(cp):>6.2f}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
EOF2
