"""Draws bench/results.png from bench/results.json (called by scripts/bench.sh)."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "bench"
with open(f"{out}/results.json") as f:
    r = json.load(f)

fig, (cost, prop) = plt.subplots(1, 2, figsize=(12, 4.5))
variants = [v for v in r["cost"]["variants"] if v["name"][0] != "a"]
cost.barh([v["name"] for v in variants], [v["envoy_cpu_us_per_call"] for v in variants], color="#4c72b0")
cost.invert_yaxis()
cost.set_xlabel("Envoy CPU µs per call (median of rounds)")
cost.set_title("What a call costs")

for label, key in [("put → first call", "put_to_first_call"), ("delete/drain → last call", "delete_or_drain_to_last_call")]:
    values = sorted(r["propagation"][key]["all_ms"])
    if values:
        prop.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
prop.set_xlabel("ms after the etcd request")
prop.set_ylabel("fraction of changes")
prop.set_title("How fast a change reaches traffic")
prop.legend()
fig.suptitle(f"etcd-mesh, {r['environment']['date']}, {r['environment']['cores']} cores")
fig.tight_layout()
fig.savefig(f"{out}/results.png", dpi=100)
