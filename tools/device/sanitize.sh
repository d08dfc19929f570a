#!/usr/bin/env bash
# Runs on the GPU machine: compute-sanitizer memcheck, racecheck and synccheck over
# the GPU test binaries in .device/, with the suites shortened (the fixed
# edge cases always run). Prints one line per (tool, binary) and the
# sanitizer's summary; full logs under $OUT.
#   SANITIZE_BINS='test-conformance test-moe'  only these binaries (default: every .device/test-*)
#   SANITIZE_TOOLS='memcheck synccheck'        only these tools (default: all three)
#   SANITIZE_PARALLEL=1                        the tools side by side (one process per tool;
#                                              the GPU has room, the suites are small)
#   SANITIZE_TIMEOUT=240                       seconds per (tool, binary)
set -uo pipefail
out=${OUT:-/tmp}
export MEDLEY_CONFORMANCE_RANDOM=${MEDLEY_CONFORMANCE_RANDOM:-12} MEDLEY_MOE_CASES=${MEDLEY_MOE_CASES:-24}
export MEDLEY_EXPERT_CASES=${MEDLEY_EXPERT_CASES:-3} MEDLEY_EXPERT_SHAPED=${MEDLEY_EXPERT_SHAPED:-0} MEDLEY_EXPERT_FULL=${MEDLEY_EXPERT_FULL:-0}
tools=${SANITIZE_TOOLS:-memcheck racecheck synccheck}
if [ -n "${SANITIZE_BINS:-}" ]; then
  bins=$(for b in $SANITIZE_BINS; do echo ".device/$b"; done)
else
  bins=$(ls .device/test-*)
fi
to=${SANITIZE_TIMEOUT:-240}
one_tool() { # one_tool TOOL: every binary under TOOL, one line each; exit 1 on any failure
  local tool=$1 st=0
  for t in $bins; do
    local log="$out/sanitize-$tool-$(basename "$t").log"
    timeout "$to" compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" --nocapture > "$log" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || st=1
    echo "$tool $(basename "$t"): exit $rc$([ "$rc" -eq 124 ] && echo " (timed out)"); $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
  done
  return $st
}
status=0
if [ "${SANITIZE_PARALLEL:-0}" = 1 ]; then
  pids=()
  for tool in $tools; do one_tool "$tool" > "$out/sanitize-$tool.txt" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  for tool in $tools; do cat "$out/sanitize-$tool.txt"; done
else
  for tool in $tools; do one_tool "$tool" || status=1; done
fi
exit $status
