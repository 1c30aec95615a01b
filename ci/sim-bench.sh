#!/usr/bin/env bash
# Speed of the events engine: simulated time against wall time for the
# big library scenarios and 100 nodes x 10 minutes, on this machine, and the
# turmoil engine on small ones. Prints one line per run.
#   bash ci/sim-bench.sh            # hundred nodes x 10 min
#   ALL=1 bash ci/sim-bench.sh      # also 1,000 nodes x 2 min, and split + heal
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p weft-sim
scenarios=(scenarios/three-nodes.toml scenarios/pod-churn.toml ci/bench/hundred-nodes-ten-minutes.toml)
if [ "${ALL:-0}" = 1 ]; then scenarios+=(ci/bench/thousand-nodes-two-minutes.toml scenarios/thousand-nodes.toml); fi
run() { # engine scenario
    # A failing check does not stop the benchmark; the figures still count.
    out=$("${CARGO_TARGET_DIR:-./target}/release/weft-sim" run "$2" --engine "$1" || true)
    echo "$1 $(basename "$2" .toml): $(grep -o 'simulated .*' <<<"$out"); $(grep -o 'gossip [0-9]* B/s per node' <<<"$out"); $(grep -o 'converged after last disruption: [^;]*' <<<"$out")"
}
for s in "${scenarios[@]}"; do run events "$s"; done
# The turmoil engine: the agent's driver loop, at the 10-node scale it is for.
for s in scenarios/three-nodes.toml scenarios/loss-30.toml scenarios/partition-heal.toml scenarios/ten-nodes.toml; do run turmoil "$s"; done
