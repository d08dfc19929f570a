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
# The C ABI's Rust tests (their GPU parts run where cuInit succeeds), all
# but cpp_consumer (it compiles C++ at run time; the consumer is built
# below instead).
for t in $(ls ffi/tests/*.rs | xargs -n1 basename | sed 's/\.rs$//' | grep -v '^cpp_consumer$'); do
  cp "$(pick test -p medley-ffi --test "$t" --no-run | tail -1)" ".device/test-ffi-$t"
done
# The C API's C++ consumer (ffi/tests/cpp/*.cpp), statically linked
# against libmedley_ffi.a (cargo builds the staticlib with the lib the ffi
# tests use) and the driver medley-cuda's build script linked (the stub
# here; the GPU machine loads its real libcuda.so.1). Named test-* so run.sh
# runs it with the GPU tests (it ignores --nocapture); it needs no other file
# (libstdc++ is linked statically: the GPU image may have an older one).
read -r ffi_lib cuda_dir < <(cargo test -p medley-ffi --no-run --message-format=json 2>/dev/null | python3 -c '
import sys, json
lib = cuda = ""
for l in sys.stdin:
    try: m = json.loads(l)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "medley_ffi":
        lib = next((f for f in m["filenames"] if f.endswith(".a")), lib)
    if m.get("reason") == "build-script-executed" and "medley-cuda" in m["package_id"]:
        cuda = next((p.split("=", 1)[-1] for p in m["linked_paths"]), cuda)
print(lib, cuda)')
[ -n "$ffi_lib" ] || { echo "build.sh: cargo did not build libmedley_ffi.a" >&2; exit 1; }
c++ -std=c++17 -O2 -Wall -Wextra -Werror -static-libstdc++ -I ffi/include ffi/tests/cpp/*.cpp "$ffi_lib" \
  ${cuda_dir:+-L"$cuda_dir"} -lcuda -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o .device/test-ffi_cpp_consumer
ex=$(pick build -p medley-cuda --features testing --example gpu_tour | tail -1)
[ -n "$ex" ] && cp "$ex" .device/gpu_tour
if [ "${BROKEN:-0}" = 1 ]; then
  # The moe test against a routing.ptx with one invalid instruction: the GPU
  # machine's run.sh checks that it fails with the JIT's message.
  cp ptx/routing.ptx /tmp/routing.ptx.orig
  sed -i '0,/^\s*ret;/s//    not_an_instruction.u32 %r1;\n    ret;/' ptx/routing.ptx
  grep -q not_an_instruction ptx/routing.ptx || { echo "build.sh: could not break routing.ptx" >&2; exit 1; }
  cp "$(pick test -p medley-cuda --test moe --no-run | tail -1)" .device/broken-test-moe
  # The same broken PTX through the C ABI: engine creation must fail with
  # the JIT's log in medley_cuda_last_jit_log (run.sh sets
  # MEDLEY_EXPECT_BROKEN_PTX=1 for it).
  cp "$(pick test -p medley-ffi --test abi --no-run | tail -1)" .device/broken-ffi-abi
  cp /tmp/routing.ptx.orig ptx/routing.ptx
fi
cp "$(pick bench -p medley-benches --bench bench_main --no-run | tail -1)" .device/bench_main
cp "$(pick build --release -p medley-benches --bin tune_experts | tail -1)" .device/tune_experts
cp benches/tools/table.py benches/tools/experts_report.py .device/
# Debug info is for this machine's debugger; the copies must fit the device
# tool's 64 MiB carry limit.
strip --strip-debug .device/test-* .device/bench_main .device/tune_experts .device/gpu_tour .device/broken-* 2>/dev/null || true
ls -la .device
