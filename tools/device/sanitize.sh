#!/usr/bin/env bash
# Runs on the GPU machine: compute-sanitizer memcheck, racecheck and synccheck over
# every GPU test binary in .device/, with the suites shortened (the fixed
# edge cases always run). Prints one line per (tool, binary) and the
# sanitizer's summary; full logs under $OUT.
set -uo pipefail
out=${OUT:-/tmp}
export MEDLEY_CONFORMANCE_RANDOM=${MEDLEY_CONFORMANCE_RANDOM:-12} MEDLEY_MOE_CASES=${MEDLEY_MOE_CASES:-24}
export MEDLEY_EXPERT_CASES=${MEDLEY_EXPERT_CASES:-3} MEDLEY_EXPERT_SHAPED=${MEDLEY_EXPERT_SHAPED:-0} MEDLEY_EXPERT_FULL=${MEDLEY_EXPERT_FULL:-0}
status=0
for tool in memcheck racecheck synccheck; do
  for t in .device/test-*; do
    log="$out/sanitize-$tool-$(basename "$t").log"
    timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" --nocapture > "$log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || status=1
    echo "$tool $(basename "$t"): exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
  done
done
exit $status
