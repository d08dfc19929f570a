#!/usr/bin/env bash
# The packaged C ABI as a C++ project uses it: installs medley-ffi with
# tools/ffi/install.sh into temporary prefixes (the CPU-only build, then the
# CUDA one), builds ffi/tests/cmake (the C++ consumer, ../cpp/*.cpp)
# through find_package(medley) against each, runs the consumer linked
# statically (medley::medley) and shared (medley::medley_shared) and a C99
# program, then builds and runs the C program through pkg-config (medley.pc
# and medley-static.pc).
#
# cmake: the one on PATH, else pip's cmake wheel in a venv under the cargo
# target directory (kept between runs). The install reuses what `cargo test`
# built (cargo profile `test`, MEDLEY_INSTALL_PROFILE to change it).
# Usage: .ci/cmake-consumer.sh   (exits non-zero on any failure)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
profile=${MEDLEY_INSTALL_PROFILE:-test}
cmake_spec=${MEDLEY_CI_CMAKE:-cmake==4.4.5}
jobs=${MEDLEY_CI_JOBS:-2}
me=.ci/cmake-consumer.sh
start=$SECONDS

fail() {
  echo "$me: FAILED: $*" >&2
  exit 1
}
work=$(mktemp -d /tmp/medley-cmake-consumer.XXXXXX)
trap 'rm -rf "$work"' EXIT

# (a) cmake.
if command -v cmake >/dev/null; then
  cmake=$(command -v cmake)
else
  venv="$target/ci-cmake-venv"
  if [ ! -x "$venv/bin/cmake" ]; then
    echo "$me: no cmake on PATH: pip install $cmake_spec into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || fail "python3 -m venv $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$cmake_spec" || fail "pip install $cmake_spec"
  fi
  cmake="$venv/bin/cmake"
fi
echo "$me: $("$cmake" --version | head -1) ($cmake)"
for t in pkg-config readelf "${CC:-cc}"; do
  command -v "$t" >/dev/null || fail "'$t' not found"
done

# run_checked LOG CMD...: runs CMD with its output in LOG, shown on failure.
run_checked() {
  local log=$1
  shift
  "$@" >"$log" 2>&1 || { cat "$log" >&2; fail "$*"; }
}
# expect OUTPUT_FILE PATTERN WHAT: OUTPUT_FILE has a line matching PATTERN.
expect() {
  grep -Eq "$2" "$1" || { cat "$1" >&2; fail "$3: no line matching '$2'"; }
}
# dyn EXE: the DT_NEEDED and RUNPATH/RPATH entries of EXE, one a line.
dyn() { readelf -d "$1" | sed -n 's/.*(\(NEEDED\|RUNPATH\|RPATH\)).*\[\(.*\)\]/\1 \2/p'; }

# CPU-only first: .ci/run's last `cargo test` was --no-default-features, so
# its files are current and only the CUDA build rebuilds medley-ffi (both
# feature sets share libmedley_ffi.a/.so; install.sh checks which it has).
for build in cpu cuda; do
  prefix="$work/prefix-$build" bdir="$work/build-$build"
  flags=(--profile "$profile")
  [ "$build" = cuda ] || flags+=(--no-cuda)
  # (b) the install tree.
  tools/ffi/install.sh --prefix "$prefix" "${flags[@]}" || fail "tools/ffi/install.sh ${flags[*]}"
  # (c)/(d) find_package(medley), the consumer built and run.
  run_checked "$work/configure-$build.log" "$cmake" -S ffi/tests/cmake -B "$bdir" \
    -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Debug
  run_checked "$work/build-$build.log" "$cmake" --build "$bdir" -j "$jobs"
  # Where no driver is installed the config links the stub: the programs
  # then need it on the loader path (never set where a driver was found).
  runenv=()
  if grep -q '^MEDLEY_CUDA_LIBRARY:FILEPATH=.*NOTFOUND' "$bdir/CMakeCache.txt" 2>/dev/null; then
    runenv=("LD_LIBRARY_PATH=$prefix/lib/medley/stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
  fi
  for exe in medley_cpp_consumer medley_cpp_consumer_shared medley_c_program; do
    out="$work/$build-$exe.out"
    env "${runenv[@]}" "$bdir/$exe" >"$out" 2>&1 || { cat "$out" >&2; fail "$build build: $exe exited non-zero"; }
    expect "$out" '^medley C(\+\+ consumer| program .*): all [0-9]+ checks passed$' "$build build: $exe"
    dyn "$bdir/$exe" >"$out.dyn"
    if grep -q '^R.*PATH .*medley/stub' "$out.dyn"; then
      cat "$out.dyn" >&2
      fail "$build build: $exe has a run path to the stub libcuda"
    fi
    case "$exe" in
      *_shared) expect "$out.dyn" '^NEEDED libmedley_ffi\.so\.[0-9]+$' "$build build: $exe links the shared library" ;;
      *) ! grep -q 'libmedley_ffi' "$out.dyn" || fail "$build build: $exe needs libmedley_ffi.so (static expected)" ;;
    esac
    if [ "$build" = cpu ] && grep -q '^NEEDED libcuda' "$out.dyn"; then
      fail "cpu build: $exe needs libcuda"
    fi
    case "$build:$exe" in
      cuda:medley_cpp*) expect "$out" '^gpu: ' "cuda build: $exe ran or skipped its GPU part" ;;
      cpu:medley_cpp*) expect "$out" '^gpu: not built \(MEDLEY_NO_CUDA\)$' "cpu build: $exe" ;;
    esac
    echo "$me: $build build, find_package(medley): $exe: $(grep -E '^gpu: |checks passed$' "$out" | paste -sd ';' | sed 's/;/; /g')"
  done
  # (e) pkg-config: the C program against medley.pc (shared) and
  # medley-static.pc (static).
  export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
  stub=()
  [ ${#runenv[@]} -eq 0 ] || [ "$build" = cpu ] || stub=("-L$(pkg-config --variable=stubdir medley)")
  for pc in medley medley-static; do
    exe="$work/$build-$pc-c"
    # shellcheck disable=SC2046 # pkg-config's output is a list of flags
    run_checked "$work/$build-$pc.log" "${CC:-cc}" -std=c99 -Wall -Wextra -Werror -pedantic \
      -DMEDLEY_EXPECT_VERSION="\"$(pkg-config --modversion "$pc")\"" ffi/tests/cmake/c_program.c \
      $(pkg-config --cflags --libs "$pc") "${stub[@]}" -Wl,-rpath,"$(pkg-config --variable=libdir "$pc")" -o "$exe"
    env "${runenv[@]}" "$exe" >"$exe.out" 2>&1 || { cat "$exe.out" >&2; fail "$build build: the pkg-config ($pc) C program exited non-zero"; }
    expect "$exe.out" '^medley C program .*: all [0-9]+ checks passed$' "$build build: pkg-config $pc"
    echo "$me: $build build, pkg-config $pc: $(cat "$exe.out")"
  done
  unset PKG_CONFIG_PATH
done
echo "$me: OK ($((SECONDS - start)) s)"
