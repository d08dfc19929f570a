#!/usr/bin/env bash
# Runs on the GPU machine (from the repo root): every GPU test, then the GPU
# benchmarks matching $1 (a criterion filter, default "cuda/"), then prints
# the benchmark table last. Logs go to $OUT when set.
set -uo pipefail
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0
for t in .device/test-*; do
  echo "== $t"
  timeout 300 "$t" --nocapture 2>&1 | grep -v '^   \|^  [0-9]*:' | tee -a "$out/tests.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
if [ "${TUNE:-0}" = 1 ]; then
  # The expert-GEMM tuning harness; the benchmarks below then use its table.
  .device/tune_experts --out "$out/medley-tuning.txt" --report "$out/tuning-report.md" 2>&1 | tail -3
  export MEDLEY_GEMM_TUNING="$out/medley-tuning.txt"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 500 .device/bench_main --bench "${1:-cuda/}" > "$out/bench.log" 2>&1 || status=1
  python3 .device/table.py "${1:-cuda/}" | tee "$out/table.md"
fi
exit $status
