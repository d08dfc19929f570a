#!/usr/bin/env bash
# Builds two benchmark binaries for a same-run A/B of a PTX change on the GPU
# machine: .device/bench_main_base with ptx/FILE as it is at REV, and
# .device/bench_main_head with the working tree's. The Rust side is the
# working tree's in both (a kernel's by-value parameter may have grown since
# REV: the driver copies only the size the old kernel declares, so plain
# calls run the old kernel unchanged). Then, on the GPU machine:
#   tools/device/run_ab.sh 'cuda/ensemble/M2_B1_V128256'
# Usage: tools/device/build_ab.sh REV FILE   (e.g. 3311cf2 ensemble.ptx)
set -euo pipefail
cd "$(dirname "$0")/../.."
rev=$1 file=$2
git cat-file -e "$rev:ptx/$file" || { echo "build_ab.sh: ptx/$file not at $rev" >&2; exit 1; }
mkdir -p .device
export RUSTFLAGS="-C target-cpu=x86-64-v2" CARGO_TARGET_DIR=/work/target-device
snap=$(mktemp -d)
trap 'rm -rf "$snap"' EXIT
git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$snap"
rm -f "$snap/cuda/ptx" && cp -P cuda/ptx "$snap/cuda/ptx"
bench() { # bench <tree> <dest>
  (cd "$1" && cargo bench -p medley-benches --bench bench_main --no-run --message-format=json 2>/dev/null) |
    python3 -c '
import sys, json
for l in sys.stdin:
    try: m = json.loads(l)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1 |
    xargs -I{} cp {} "$2"
}
bench "$snap" .device/bench_main_head
git show "$rev:ptx/$file" > "$snap/ptx/$file"
bench "$snap" .device/bench_main_base
cmp -s .device/bench_main_base .device/bench_main_head && { echo "build_ab.sh: the two builds are identical" >&2; exit 1; }
strip --strip-debug .device/bench_main_base .device/bench_main_head
cp tools/device/run_ab.sh .device/
ls -la .device/bench_main_base .device/bench_main_head
