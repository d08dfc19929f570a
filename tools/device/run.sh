#!/usr/bin/env bash
# Runs on the GPU machine (from the repo root): every GPU test, then the GPU
# benchmarks matching $1 (a criterion filter, default "cuda/"), then prints
# the benchmark table last. Logs go to $OUT when set.
set -uo pipefail
out=${OUT:-/tmp}
# On the GPU machine no GPU test may skip: a skip is a failure.
export MEDLEY_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0
for t in .device/test-*; do
  echo "== $t"
  timeout 300 "$t" --nocapture 2>&1 | grep -v '^   \|^  [0-9]*:' | tee -a "$out/tests.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
# The skip messages the tests print (owned.rs's open_or_skip, the
# conformance suite's GPU half, the C++ consumer). Counts such as "0 cases
# skipped by MEDLEY_SAMPLE_MAX_ROW" are not skips.
skip_re='GPU half skipped|^gpu: (MoE )?skipped'
if grep -qE "$skip_re" "$out/tests.log"; then
  echo "run.sh: a GPU test reported a skip:"; grep -E "$skip_re" "$out/tests.log"; status=1
fi
# The runnable example (opens the device, combines two models, routes tokens
# through the expert layer, checks against the core).
if [ -x .device/gpu_tour ]; then
  echo "== .device/gpu_tour"
  .device/gpu_tour 2>&1 | tee "$out/gpu_tour.log" | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
# A test binary built from a deliberately broken PTX (tools/device/build.sh
# BROKEN=1): it must fail, with the JIT's message.
if [ -x .device/broken-test-moe ]; then
  echo "== .device/broken-test-moe (must fail with the JIT log)"
  if .device/broken-test-moe 2>&1 | tee "$out/broken.log" | grep -m3 -E "JIT log|ptxas|error"; then :; fi
  grep -q "JIT log" "$out/broken.log" || { echo "run.sh: the broken PTX did not report the JIT log"; status=1; }
fi
if [ -x .device/broken-ffi-abi ]; then
  echo "== .device/broken-ffi-abi (the C ABI reports the broken PTX's JIT log)"
  MEDLEY_EXPECT_BROKEN_PTX=1 .device/broken-ffi-abi broken_ptx --nocapture 2>&1 | tee "$out/broken-ffi.log" | tail -4
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
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
