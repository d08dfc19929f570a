#!/usr/bin/env bash
# Runs on the GPU machine: the benchmarks matching FILTER once per PTX
# variant, all from one binary (.device/bench_main): "base" is the embedded
# PTX, every other name a folder .device/var/NAME whose *.ptx files replace
# the embedded modules (MEDLEY_PTX_DIR, see medley_cuda::registry). Extra
# environment per variant: NAME=base:ENV=VALUE runs base with ENV set.
# Rounds alternate the variants so drift shows; prints one table of medians
# (us), each variant's mean ratio to base last. Logs and estimates to $OUT.
# Usage: tools/device/run_variants.sh FILTER ROUNDS VARIANT...
set -u
filter=${1:?usage: run_variants.sh FILTER ROUNDS VARIANT...} rounds=${2:?} ; shift 2
out=${OUT:-/tmp}
for round in $(seq 1 "$rounds"); do
  for v in "$@"; do
    name=${v%%:*} envs=()
    [[ $v == *:* ]] && envs=("${v#*:}")
    dir=.device/var/$name
    [[ $name == base ]] && dir=
    [[ -n $dir && ! -d $dir ]] && { echo "run_variants.sh: no $dir" >&2; exit 1; }
    tag=${v//[^A-Za-z0-9_]/_}
    env ${dir:+MEDLEY_PTX_DIR=$dir} "${envs[@]}" CRITERION_HOME=/tmp/crit_${tag}_$round \
      timeout 280 .device/bench_main --bench "$filter" > "$out/bench_${tag}_$round.log" 2>&1 ||
      echo "run_variants.sh: $v round $round failed"
  done
done
python3 - "$out" "$rounds" "$@" <<'PY'
import json, pathlib, re, statistics, sys
out, rounds, vs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
tags = [re.sub(r"[^A-Za-z0-9_]", "_", v) for v in vs]
def load(d):
    r = {}
    for est in pathlib.Path(d).glob("**/new/estimates.json"):
        b = json.loads((est.parent / "benchmark.json").read_text())
        r[b["full_id"]] = json.loads(est.read_text())["median"]["point_estimate"] / 1e3
    return r
runs = {(t, k): load(f"/tmp/crit_{t}_{k}") for t in tags for k in range(1, rounds + 1)}
json.dump({f"{t}_{k}": v for (t, k), v in runs.items()}, open(out + "/variant_estimates.json", "w"), indent=0)
keys = sorted(set().union(*[set(r) for r in runs.values()]))
print("| benchmark | " + " | ".join(vs) + " |")
print("|---|" + "---|" * len(vs))
for key in keys:
    med = [statistics.median([runs[(t, k)][key] for k in range(1, rounds + 1) if key in runs[(t, k)]] or [float("nan")]) for t in tags]
    print(f"| {key} | " + " | ".join(f"{m:.1f} ({m / med[0]:.3f})" for m in med) + " |")
PY
