#!/usr/bin/env bash
# Speed of the events engine: simulated time against wall time for the
# big library scenarios, on this machine. Prints one line per scenario.
#   bash ci/sim-bench.sh            # hundred-nodes (and thousand-nodes with ALL=1)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p weft-sim
scenarios=(scenarios/three-nodes.toml scenarios/pod-churn.toml scenarios/hundred-nodes.toml)
if [ "${ALL:-0}" = 1 ]; then scenarios+=(scenarios/thousand-nodes.toml); fi
for s in "${scenarios[@]}"; do
    # A failing check does not stop the benchmark; the figures still count.
    out=$(./target/release/weft-sim run "$s" || true)
    echo "$(basename "$s" .toml): $(grep -o 'simulated .*' <<<"$out"); $(grep -o 'gossip [0-9]* B/s per node' <<<"$out")"
done
