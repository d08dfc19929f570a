#!/usr/bin/env bash
# Runs on the GPU machine: the benchmarks matching FILTER with
# .device/bench_main_base and .device/bench_main_head (tools/device/build_ab.sh),
# alternating base, head, base, head so drift shows, and prints one table of
# medians (us) with head / base. Logs and estimates go to $OUT when set.
# Only calls both builds support compare (a base that predates an output
# ignores it).
set -u
filter=${1:?usage: run_ab.sh FILTER}
out=${OUT:-/tmp}
for round in 1 2; do
  for side in base head; do
    CRITERION_HOME=/tmp/crit_${side}_$round timeout 280 .device/bench_main_$side --bench "$filter" \
      > "$out/bench_${side}_$round.log" 2>&1 || echo "run_ab.sh: $side round $round failed"
  done
done
python3 - "$out" <<'PY'
import json, pathlib, sys
def load(d):
    r = {}
    for est in pathlib.Path(d).glob("**/new/estimates.json"):
        b = json.loads((est.parent / "benchmark.json").read_text())
        r[b["full_id"]] = json.loads(est.read_text())["median"]["point_estimate"] / 1e3
    return r
runs = {(s, k): load(f"/tmp/crit_{s}_{k}") for s in ("base", "head") for k in (1, 2)}
json.dump({f"{s}_{k}": v for (s, k), v in runs.items()}, open(sys.argv[1] + "/ab_estimates.json", "w"), indent=0)
print("| benchmark | base 1 | head 1 | base 2 | head 2 | head / base (mean of rounds) |")
print("|---|---|---|---|---|---|")
for key in sorted(runs[("base", 1)]):
    v = [runs[(s, k)].get(key) for k in (1, 2) for s in ("base", "head")]
    if None in v:
        continue
    ratio = (v[1] / v[0] + v[3] / v[2]) / 2
    print(f"| {key} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | {v[3]:.1f} | {ratio:.3f} |")
PY
