#!/usr/bin/env bash
# Builds the binaries the GPU machine runs (it has no Rust toolchain) into
# .device/ (git-ignored; pass it in the device tool's `carry`). They target a
# generic x86-64-v2 CPU and link the stub driver; the real driver is found
# on the GPU machine at run time. Usage: tools/device/build.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .device
export RUSTFLAGS="-C target-cpu=x86-64-v2" CARGO_TARGET_DIR=/work/target-device
pick() { # pick <cargo args...>: path of the executable cargo built
  cargo "$@" --message-format=json 2>/dev/null | python3 -c '
import sys, json
for l in sys.stdin:
    try: m = json.loads(l)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])'
}
for t in $(ls cuda/tests/*.rs | xargs -n1 basename | sed 's/\.rs$//'); do
  cp "$(pick test -p medley-cuda --test "$t" --no-run | tail -1)" ".device/test-$t"
done
cp "$(pick bench -p medley-benches --bench bench_main --no-run | tail -1)" .device/bench_main
cp benches/tools/table.py .device/table.py
ls -la .device
