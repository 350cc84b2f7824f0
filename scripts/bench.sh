#!/usr/bin/env bash
# make bench: builds, runs every benchmark (loopback only, bounded), writes
# bench/results.json, bench/RESULTS.md and bench/results.png. Extra
# arguments go to the driver (`--help`; `--scale-only` reruns the Scale
# section and keeps the other figures of bench/results.json).
set -euo pipefail
cd "$(dirname "$0")/.."
# The scale ladder holds 10,000 long-polls (a descriptor each, in the driver
# and in sync-server): as many descriptors as allowed, 65,536 at most.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# The scale ladder runs the release sync-server binary.
cargo build --release -p etcd-mesh-bench -p etcd-mesh-sync-server
# The cost ladder's empty filter is the plugin's `noop` role, which the shipped
# module (`make build`) does not carry: a module with it, in its own target dir.
CARGO_TARGET_DIR=target/bench-noop scripts/build-wasm.sh etcd-mesh-plugin --features bench-noop
# The last committed results are "before" in the new RESULTS.md.
git show HEAD:bench/results.json > bench/before.json 2>/dev/null || rm -f bench/before.json
target/release/etcd-mesh-bench --out bench "$@"
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q --disable-pip-version-check matplotlib
.venv/bin/python bench/plot.py bench
echo "bench: see bench/RESULTS.md"
