#!/usr/bin/env bash
# Prepares a same-run A/B of a PTX change on the GPU machine from one binary:
# .device/bench_main built from the working tree (its embedded PTX is the
# "head" side), and ptx/FILE as it is at REV in .device/var/rev/FILE, which
# MEDLEY_PTX_DIR loads in place of the embedded module. The Rust side is the
# working tree's for both (a kernel's by-value parameter may have grown since
# REV: the driver copies only the size the old kernel declares, so plain calls
# run the old kernel unchanged). Then, on the GPU machine:
#   tools/device/run_ab.sh 'cuda/ensemble/M2_B1_V128256'
# Usage: tools/device/build_ab.sh REV FILE   (e.g. 3311cf2 ensemble.ptx)
set -euo pipefail
cd "$(dirname "$0")/../.."
rev=$1 file=$2
git cat-file -e "$rev:ptx/$file" || { echo "build_ab.sh: ptx/$file not at $rev" >&2; exit 1; }
mkdir -p .device/var/rev
git show "$rev:ptx/$file" > ".device/var/rev/$file"
cmp -s ".device/var/rev/$file" "ptx/$file" && echo "build_ab.sh: ptx/$file is the same at $rev and in the working tree" >&2
export RUSTFLAGS="-C target-cpu=x86-64-v2" CARGO_TARGET_DIR=/work/target-device
cargo bench -p medley-benches --bench bench_main --no-run --message-format=json 2>/dev/null |
  python3 -c '
import sys, json
for l in sys.stdin:
    try: m = json.loads(l)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1 |
  xargs -I{} cp {} .device/bench_main
strip --strip-debug .device/bench_main
cp tools/device/run_ab.sh tools/device/run_variants.sh .device/
ls -la .device/bench_main ".device/var/rev/$file"
