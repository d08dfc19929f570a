#!/usr/bin/env bash
# Runs on the GPU machine (repo root, binaries from tools/device/build.sh in
# .device/): what benches/results/graph-replay.md left for a GPU. In order:
#   1. every GPU test (tools/device/run.sh SKIP_BENCH=1), which includes
#      cuda/tests/moe.rs's v3 gating tests and cuda/tests/graph.rs;
#   2. compute-sanitizer memcheck, racecheck and synccheck on the gating
#      tests (MEDLEY_MOE_CASES=24) and on the graph tests;
#   3. the gating benches (bf16 = Auto, bf16_v1, bf16_v2, bf16_v3, and the
#      _graph variants of Auto, v2, v3), the
#      decode-ensemble benches (v2, v2_graph), then
#      benches/tools/graph_peers.py (PyTorch in graphs) in the same call;
#   4. ncu of gate_topk_v3 and gate_grouped_v3 at T 16384, E 256, of ensemble_v2 at the two
#      decode shapes where torch.compile led (linear M 8 / M 2, B 1, V 128256)
#      and at log-linear M 8 / M 2, B 256, V 128256 (the bandwidth gap).
# Everything lands under $OUT (default /tmp/graph-gating); medley.json holds
# the criterion medians in us. PHASE=tests runs 1-2 only, PHASE=bench 3-4
# only (each fits one 10-minute device call); the default runs all. Through the device tool
# (which returns few files), tar it:
#   OUT=$OUT/g bash tools/device/graph_and_gating.sh; tar cJf $OUT/g.tar.xz -C $OUT g
set -uo pipefail
out=${OUT:-/tmp/graph-gating}
mkdir -p "$out"
export MEDLEY_REQUIRE_GPU=1
t0=$(date +%s)
lap() { echo "$1 ($(( $(date +%s) - t0 )) s)"; }
phase=${PHASE:-all}
if [ "$phase" != bench ]; then
OUT=$out SKIP_BENCH=1 bash tools/device/run.sh > "$out/run.log" 2>&1; lap "run.sh rc $?"
grep -E "^== |test result|gate_v3:|gating:|non-finite bias:|FAILED|panicked" "$out/run.log" | head -60
for tool in memcheck racecheck synccheck; do
  MEDLEY_MOE_CASES=24 timeout 150 compute-sanitizer --tool $tool --error-exitcode 99 .device/test-moe gat grouped > "$out/san-$tool-moe.log" 2>&1
  echo "$tool test-moe gat rc $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/san-$tool-moe.log" | tail -1)"
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 99 .device/test-graph > "$out/san-$tool-graph.log" 2>&1
  echo "$tool test-graph rc $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/san-$tool-graph.log" | tail -1)"
done
lap sanitizers
fi
[ "$phase" = tests ] && exit 0
CRITERION_HOME=$out/criterion timeout 300 .device/bench_main --bench 'cuda/gating/' > "$out/bench-gating.log" 2>&1; lap "bench gating rc $?"
CRITERION_HOME=$out/criterion timeout 150 .device/bench_main --bench 'cuda/ensemble/M._B(1|8)_V.*/(linear|loglinear)/(v2|v2_graph)$' > "$out/bench-ens.log" 2>&1; lap "bench ensemble rc $?"
OUT=$out timeout 200 python3 benches/tools/graph_peers.py > "$out/peers.log" 2>&1; lap "graph peers rc $?"
sections="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section InstructionStats"
timeout 90 ncu --kernel-name gate_topk_v3 --launch-skip 20 --launch-count 1 $sections .device/bench_main --bench 'cuda/gating/E256_k8_T16384/topk_softmax/bf16_v3$' > "$out/ncu-gate_topk_v3.txt" 2>&1; lap "ncu v3 rc $?"
timeout 90 ncu --kernel-name gate_grouped_v3 --launch-skip 20 --launch-count 1 $sections .device/bench_main --bench 'cuda/gating/E256_k8_T16384/deepseek_v3/bf16_v3$' > "$out/ncu-gate_grouped_v3.txt" 2>&1; lap "ncu grouped v3 rc $?"
for m in 8 2; do
  timeout 90 ncu --kernel-name ensemble_v2 --launch-skip 20 --launch-count 1 $sections .device/bench_main --bench "cuda/ensemble/M${m}_B1_V128256/linear/v2\$" > "$out/ncu-ensemble-linear-M$m-B1.txt" 2>&1; lap "ncu ensemble M$m rc $?"
done
for m in 8 2; do
  timeout 90 ncu --kernel-name ensemble_v2 --launch-skip 20 --launch-count 1 $sections --section MemoryWorkloadAnalysis .device/bench_main --bench "cuda/ensemble/M${m}_B256_V128256/loglinear/v2\$" > "$out/ncu-ensemble-loglinear-M$m-B256.txt" 2>&1; lap "ncu ensemble loglinear M$m B256 rc $?"
done
# criterion medians (us) by benchmark id: gpu_report.load
python3 -c 'import json, sys; sys.path.insert(0, "benches/tools"); import gpu_report; print(json.dumps(gpu_report.load(sys.argv[1]), indent=0))' "$out/criterion" > "$out/medley.json"
rm -rf "$out/criterion"
python3 benches/tools/graph_table.py "$out" | tee "$out/tables.md"
lap done
