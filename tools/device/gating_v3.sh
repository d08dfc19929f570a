#!/usr/bin/env bash
# Runs on the GPU machine (repo root, binaries from tools/device/build.sh in
# .device/): the v3 gating kernels' first GPU run, in one device call of
# under 10 minutes. In order:
#   1. the MoE, graph and driver tests (cuda/tests/moe.rs: every gating
#      kernel against the core, the v3 suites, the refusals, the
#      non-finite-bias rule; cuda/tests/graph.rs; the kernel registry);
#   2. compute-sanitizer memcheck and synccheck on the v3 and grouped tests
#      (MEDLEY_MOE_CASES=24), racecheck on the v3 test (RACECHECK= skips
#      it: the v3 kernels use no shared memory), memcheck on the graph tests;
#   3. the gating benches (Auto, v1, v2, v3; Auto, v2 and v3 replayed from
#      graphs), then benches/tools/graph_peers.py's gating rows (softmax
#      top-k and DeepSeek-V3 grouped);
#   4. ncu of gate_topk_v3 and gate_grouped_v3 at T 16384, E 256.
# Everything under $OUT (default /tmp/gating-v3): medley.json (criterion
# medians, us), graph-peers.json, tables.md. Tar it for the device tool:
#   OUT=$OUT/g bash tools/device/gating_v3.sh; tar cJf $OUT/g.tar.xz -C $OUT g
set -uo pipefail
out=${OUT:-/tmp/gating-v3}
mkdir -p "$out"
export MEDLEY_REQUIRE_GPU=1
t0=$(date +%s)
lap() { echo "$1 ($(( $(date +%s) - t0 )) s)"; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
for t in moe graph driver; do
  timeout 200 .device/test-$t --nocapture > "$out/test-$t.log" 2>&1; rc=$?
  lap "test-$t rc $rc"
  grep -E "test result|gate_v3:|gating:|non-finite bias:|FAILED|panicked|skipped" "$out/test-$t.log" | head -20
done
run_san() {  # tool, log name, binary and filters...
  local tool=$1 name=$2; shift 2
  MEDLEY_MOE_CASES=24 timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 99 "$@" > "$out/san-$name.log" 2>&1
  echo "$tool $name rc $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/san-$name.log" | tail -1)"
}
run_san memcheck memcheck-moe .device/test-moe v3 grouped
run_san synccheck synccheck-moe .device/test-moe v3 grouped
[ -n "${RACECHECK-1}" ] && run_san racecheck racecheck-moe .device/test-moe gate_v3_kernels_match
run_san memcheck memcheck-graph .device/test-graph
lap sanitizers
CRITERION_HOME=$out/criterion timeout 240 .device/bench_main --bench 'cuda/gating/' > "$out/bench-gating.log" 2>&1; lap "bench gating rc $?"
# criterion medians (us) by benchmark id: gpu_report.load
python3 -c 'import json, sys; sys.path.insert(0, "benches/tools"); import gpu_report; print(json.dumps(gpu_report.load(sys.argv[1]), indent=0))' "$out/criterion" > "$out/medley.json"
rm -rf "$out/criterion"
python3 benches/tools/graph_table.py "$out" > "$out/tables.md" 2>/dev/null
OUT=$out GRAPH_PEERS_ONLY=gating timeout 150 python3 benches/tools/graph_peers.py > "$out/peers.log" 2>&1; lap "graph peers rc $?"
sections="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section InstructionStats"
for kv in "gate_topk_v3 topk_softmax" "gate_grouped_v3 deepseek_v3"; do
  set -- $kv
  timeout 60 ncu --kernel-name "$1" --launch-skip 20 --launch-count 1 $sections .device/bench_main --bench "cuda/gating/E256_k8_T16384/$2/bf16_v3\$" > "$out/ncu-$1.txt" 2>&1; lap "ncu $1 rc $?"
done
python3 benches/tools/graph_table.py "$out" | tee "$out/tables.md"
lap done
