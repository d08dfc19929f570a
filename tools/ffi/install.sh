#!/usr/bin/env bash
# Builds medley-ffi and installs the C ABI as a relocatable tree for C and
# C++ builds (see "Packaging: CMake and pkg-config" in ffi/README.md):
#
#   PREFIX/include/medley.h
#   PREFIX/lib/libmedley_ffi.a
#   PREFIX/lib/libmedley_ffi.so.<abi major>.<abi minor>   (SONAME libmedley_ffi.so.<abi major>)
#   PREFIX/lib/libmedley_ffi.so.<abi major>, libmedley_ffi.so   (links)
#   PREFIX/lib/medley/stub/libcuda.so, libcuda.so.1        (CUDA build only: the stub driver)
#   PREFIX/lib/cmake/medley/medleyConfig.cmake, medleyConfigVersion.cmake
#   PREFIX/lib/pkgconfig/medley.pc, medley-static.pc
#
# Usage: tools/ffi/install.sh --prefix DIR [--no-cuda] [--release | --debug | --profile NAME] [--verbose]
#   --prefix DIR    where to install (created; our files in it are replaced)
#   --no-cuda       the CPU-only build (--no-default-features): no medley_cuda_*
#                   functions, no libcuda; consumers get -DMEDLEY_NO_CUDA
#   --release       cargo's release profile (the default)
#   --debug         cargo's dev profile (target/debug)
#   --profile NAME  any cargo profile (CI uses `test`, which `cargo test` built)
#   --verbose       show cargo's progress
# Environment: CARGO (default cargo), RUSTC (default rustc), CC (default cc,
# only to build the stub where cargo generated none), CARGO_TARGET_DIR.
# Needs nm and readelf (binutils). Prints one line on success.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
me=tools/ffi/install.sh

die() {
  echo "$me: $*" >&2
  exit 1
}
usage() {
  sed -n '/^# Usage:/,/^# Needs/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

prefix="" cuda=1 profile=release verbose=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#--prefix=}; shift ;;
    --no-cuda) cuda=0; shift ;;
    --release) profile=release; shift ;;
    --debug) profile=dev; shift ;;
    --profile) [ $# -ge 2 ] || die "--profile needs a cargo profile name"; profile=$2; shift 2 ;;
    --profile=*) profile=${1#--profile=}; shift ;;
    --verbose|-v) verbose=1; shift ;;
    -h|--help) usage ;;
    *) echo "$me: unknown argument '$1'" >&2; usage ;;
  esac
done
[ -n "$prefix" ] || { echo "$me: --prefix DIR is required" >&2; usage; }
for t in nm readelf; do
  command -v "$t" >/dev/null || die "'$t' not found (install binutils)"
done
mkdir -p "$prefix" || die "cannot create $prefix"
prefix=$(cd "$prefix" && pwd)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/medley-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

features=()
[ "$cuda" -eq 1 ] || features=(--no-default-features)
quiet=(--quiet)
[ "$verbose" -eq 0 ] || quiet=()

# cargo build; its JSON messages (artifacts, build-script outputs) go to
# $tmp/build.json, its diagnostics to stderr.
build() {
  (cd "$repo" && "${CARGO:-cargo}" build "${quiet[@]}" -p medley-ffi --profile "$profile" "${features[@]}" \
    --message-format=json-render-diagnostics) >"$tmp/build.json" \
    || die "cargo build -p medley-ffi --profile $profile ${features[*]} failed"
}
# artifact SUFFIX: the medley_ffi artifact cargo reported, ending in SUFFIX.
artifact() {
  grep '"reason":"compiler-artifact"' "$tmp/build.json" | grep '"name":"medley_ffi"' \
    | grep -o "\"[^\"]*/libmedley_ffi$1\"" | tr -d '"' | tail -1
}
# has_gpu FILE NM-ARGS...: whether FILE defines the GPU entry points.
has_gpu() {
  local f=$1
  shift
  nm "$@" --defined-only --extern-only "$f" 2>/dev/null | awk '$NF == "medley_cuda_probe" { f = 1 } END { exit !f }'
}
# Both feature sets write the same libmedley_ffi.a/.so (cargo gives them no
# per-feature name), so a build cargo reports as fresh can leave the other
# feature set's files in place: check, and rebuild medley-ffi once if so.
check_files() {
  a=$(artifact .a) so=$(artifact .so)
  [ -n "$a" ] && [ -f "$a" ] || die "cargo reported no libmedley_ffi.a"
  [ -n "$so" ] && [ -f "$so" ] || die "cargo reported no libmedley_ffi.so"
  local want=false ga=false gs=false
  [ "$cuda" -eq 0 ] || want=true
  ! has_gpu "$a" || ga=true
  ! has_gpu "$so" -D || gs=true
  [ "$ga" = "$want" ] && [ "$gs" = "$want" ]
}
build
if ! check_files; then
  [ "$verbose" -eq 0 ] || echo "$me: $a is the other feature set's: rebuilding medley-ffi" >&2
  touch "$repo/ffi/src/lib.rs"
  build
  check_files || die "$a or $so does not match the requested build (cuda=$cuda) even after a rebuild"
fi

# What the build is: crate version, ABI version, SONAME.
# The version: ffi/Cargo.toml's own, else the workspace's (workspace.package).
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/ffi/Cargo.toml" | head -1)
[ -n "$version" ] || version=$(awk '/^\[/ { s = ($0 == "[workspace.package]") }
  s && /^version *=/ { gsub(/.*= *"|".*/, ""); print; exit }' "$repo/Cargo.toml")
[ -n "$version" ] || die "cannot read the crate version from ffi/Cargo.toml or Cargo.toml's [workspace.package]"
header="$repo/ffi/include/medley.h"
abi_major=$(sed -n 's/^#define MEDLEY_ABI_VERSION_MAJOR \([0-9]*\).*/\1/p' "$header")
abi_minor=$(sed -n 's/^#define MEDLEY_ABI_VERSION_MINOR \([0-9]*\).*/\1/p' "$header")
[ -n "$abi_major" ] && [ -n "$abi_minor" ] || die "no MEDLEY_ABI_VERSION_MAJOR/MINOR in $header"
soname=$(readelf -d "$so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$soname" = "libmedley_ffi.so.$abi_major" ] \
  || die "$so has SONAME '$soname', expected libmedley_ffi.so.$abi_major (ffi/build.rs sets it)"

# The C runtime the static library needs besides libcuda: what rustc says
# a staticlib of this toolchain links (`rustc --print native-static-libs`).
# medley's own native dependency is the CUDA driver alone (the cuda build).
printf '// empty\n' >"$tmp/probe.rs"
runtime=$(cd "$repo" && "${RUSTC:-rustc}" --crate-type staticlib --crate-name medley_probe --print native-static-libs \
  -o "$tmp/libprobe.a" "$tmp/probe.rs" 2>&1 | sed -n 's/.*native-static-libs: //p' | tail -1)
[ -n "$runtime" ] || die "rustc --print native-static-libs printed nothing"
runtime_cmake=$(echo "$runtime" | sed 's/-l//g')

# The stub driver (CUDA build): the one medley-cuda's build script made, or,
# where it linked a real driver and made none, the same stub built here.
stub=""
if [ "$cuda" -eq 1 ]; then
  stub=$(grep '"reason":"build-script-executed"' "$tmp/build.json" \
    | grep -o '"native=[^"]*/build/medley-cuda-[^"/]*/out/stub"' | tr -d '"' | sed 's/^native=//' | tail -1)
  if [ -z "$stub" ] || [ ! -f "$stub/libcuda.so" ]; then
    stub="$tmp/stub"
    mkdir -p "$stub"
    grep -v '^\s*\(#\|$\)' "$repo/cuda/stub/symbols.txt" \
      | awk '{printf "int %s(void) { return 34; }\n", $1}' >"$tmp/libcuda_stub.c"
    "${CC:-cc}" -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$tmp/libcuda_stub.c" \
      || die "cannot build the stub libcuda with ${CC:-cc}"
  fi
fi

# Install.
lib="$prefix/lib"
real="libmedley_ffi.so.$abi_major.$abi_minor"
mkdir -p "$prefix/include" "$lib/cmake/medley" "$lib/pkgconfig"
install -m 644 "$header" "$prefix/include/medley.h"
install -m 644 "$a" "$lib/libmedley_ffi.a"
rm -f "$lib"/libmedley_ffi.so*
install -m 755 "$so" "$lib/$real"
ln -s "$real" "$lib/$soname"
ln -s "$soname" "$lib/libmedley_ffi.so"
rm -rf "$lib/medley/stub"
if [ -n "$stub" ]; then
  mkdir -p "$lib/medley/stub"
  install -m 755 "$stub/libcuda.so" "$lib/medley/stub/libcuda.so"
  ln -s libcuda.so "$lib/medley/stub/libcuda.so.1"
fi
rmdir "$lib/medley" 2>/dev/null || true

if [ "$cuda" -eq 1 ]; then
  has_cuda=TRUE build_name=cuda defines="" pc_cflags="" pc_cuda=" -lcuda" pc_cuda_var="yes"
else
  has_cuda=FALSE build_name=cpu-only defines="MEDLEY_NO_CUDA" pc_cflags=" -DMEDLEY_NO_CUDA" pc_cuda="" pc_cuda_var="no"
fi

cat >"$lib/cmake/medley/medleyConfigVersion.cmake" <<EOF
# medley $version: generated by $me. Compatible: the same major version
# (for 0.x, the same 0.minor, as in Cargo's semver), at least the version
# asked for; 64-bit only. Version ranges are honoured.
set(PACKAGE_VERSION "$version")
set(PACKAGE_VERSION_COMPATIBLE FALSE)
set(PACKAGE_VERSION_EXACT FALSE)
if(NOT CMAKE_SIZEOF_VOID_P STREQUAL "" AND NOT CMAKE_SIZEOF_VOID_P EQUAL 8)
  set(PACKAGE_VERSION "\${PACKAGE_VERSION} (64bit)")
  set(PACKAGE_VERSION_UNSUITABLE TRUE)
  return()
endif()
string(REGEX MATCH "^([0-9]+)\\\\.([0-9]+)" _medley_mm "\${PACKAGE_VERSION}")
set(_medley_major "\${CMAKE_MATCH_1}")
set(_medley_minor "\${CMAKE_MATCH_2}")
if(PACKAGE_FIND_VERSION_RANGE)
  set(_medley_lo "\${PACKAGE_FIND_VERSION_MIN}")
  set(_medley_ok TRUE)
  if(PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION_MIN)
    set(_medley_ok FALSE)
  endif()
  if(PACKAGE_FIND_VERSION_RANGE_MAX STREQUAL "INCLUDE" AND PACKAGE_VERSION VERSION_GREATER PACKAGE_FIND_VERSION_MAX)
    set(_medley_ok FALSE)
  endif()
  if(PACKAGE_FIND_VERSION_RANGE_MAX STREQUAL "EXCLUDE" AND PACKAGE_VERSION VERSION_GREATER_EQUAL PACKAGE_FIND_VERSION_MAX)
    set(_medley_ok FALSE)
  endif()
else()
  set(_medley_lo "\${PACKAGE_FIND_VERSION}")
  set(_medley_ok TRUE)
  if(PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION)
    set(_medley_ok FALSE)
  endif()
endif()
# The lower bound must be of this major (0.minor) line.
if(NOT "\${_medley_lo}" STREQUAL "")
  string(REGEX MATCH "^([0-9]+)(\\\\.([0-9]+))?" _medley_mm "\${_medley_lo}")
  if(NOT CMAKE_MATCH_1 EQUAL _medley_major)
    set(_medley_ok FALSE)
  elseif(_medley_major EQUAL 0 AND NOT "\${CMAKE_MATCH_3}" STREQUAL "" AND NOT CMAKE_MATCH_3 EQUAL _medley_minor)
    set(_medley_ok FALSE)
  endif()
endif()
set(PACKAGE_VERSION_COMPATIBLE \${_medley_ok})
if(PACKAGE_FIND_VERSION AND PACKAGE_VERSION VERSION_EQUAL PACKAGE_FIND_VERSION)
  set(PACKAGE_VERSION_EXACT TRUE)
endif()
unset(_medley_mm)
unset(_medley_major)
unset(_medley_minor)
unset(_medley_lo)
unset(_medley_ok)
EOF

cat >"$lib/cmake/medley/medleyConfig.cmake" <<EOF
# medley $version (C ABI $abi_major.$abi_minor), the $build_name build (cargo profile
# $profile): generated by $me. Relocatable: every path is relative to this file.
#
# Imported targets:
#   medley::medley         the static library libmedley_ffi.a with what it links:
#                          the C runtime ($runtime_cmake) and, in the CUDA build,
#                          medley::cuda_driver
#   medley::medley_shared  the shared library libmedley_ffi.so (SONAME $soname)
#   medley::cuda_driver    (CUDA build) the CUDA driver library to link
# Both carry the include directory and, in the CPU-only build, the compile
# definition MEDLEY_NO_CUDA.
#
# Variables set: MEDLEY_VERSION, MEDLEY_ABI_VERSION, MEDLEY_HAS_CUDA (which
# build this is), MEDLEY_PROFILE, MEDLEY_INCLUDE_DIR, MEDLEY_STATIC_LIBRARY,
# MEDLEY_SHARED_LIBRARY; in the CUDA build also MEDLEY_CUDA_STUB (TRUE when
# the stub driver is linked) and MEDLEY_CUDA_STUB_DIR.
#
# The CUDA driver (CUDA build): the cache variable MEDLEY_CUDA_LIBRARY if set
# (a libcuda.so or libcuda.so.1), else find_library() of the installed driver
# (cuda, libcuda.so.1); if there is none, the stub libcuda in
# lib/medley/stub/ of this install, linked as -L<stub> -lcuda so that no
# RPATH points at it: the program then loads the real libcuda.so.1 wherever
# one is installed, and on a machine without one runs with
# LD_LIBRARY_PATH=<stub> (GPU calls then fail with CUDA error 34).
cmake_policy(PUSH)
cmake_policy(VERSION 3.13...3.31)

get_filename_component(_medley_prefix "\${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

set(MEDLEY_VERSION "$version")
set(MEDLEY_ABI_VERSION "$abi_major.$abi_minor")
set(MEDLEY_HAS_CUDA $has_cuda)
set(MEDLEY_PROFILE "$profile")
set(MEDLEY_INCLUDE_DIR "\${_medley_prefix}/include")
set(MEDLEY_STATIC_LIBRARY "\${_medley_prefix}/lib/libmedley_ffi.a")
set(MEDLEY_SHARED_LIBRARY "\${_medley_prefix}/lib/$real")

foreach(_medley_f "\${MEDLEY_INCLUDE_DIR}/medley.h" "\${MEDLEY_STATIC_LIBRARY}" "\${MEDLEY_SHARED_LIBRARY}")
  if(NOT EXISTS "\${_medley_f}")
    set(\${CMAKE_FIND_PACKAGE_NAME}_FOUND FALSE)
    set(\${CMAKE_FIND_PACKAGE_NAME}_NOT_FOUND_MESSAGE "medley: \${_medley_f} is missing (reinstall with tools/ffi/install.sh)")
    unset(_medley_f)
    unset(_medley_prefix)
    cmake_policy(POP)
    return()
  endif()
endforeach()
unset(_medley_f)

if(MEDLEY_HAS_CUDA AND NOT TARGET medley::cuda_driver)
  set(MEDLEY_CUDA_STUB_DIR "\${_medley_prefix}/lib/medley/stub")
  find_library(MEDLEY_CUDA_LIBRARY NAMES cuda libcuda.so.1
    PATHS /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/wsl/lib
    DOC "The CUDA driver library medley links (libcuda.so or libcuda.so.1); unset: the installed driver, else medley's stub")
  add_library(medley::cuda_driver INTERFACE IMPORTED)
  if(MEDLEY_CUDA_LIBRARY)
    set(MEDLEY_CUDA_STUB FALSE)
    set_target_properties(medley::cuda_driver PROPERTIES INTERFACE_LINK_LIBRARIES "\${MEDLEY_CUDA_LIBRARY}")
  else()
    if(NOT EXISTS "\${MEDLEY_CUDA_STUB_DIR}/libcuda.so")
      message(FATAL_ERROR "medley: no CUDA driver found and no stub in \${MEDLEY_CUDA_STUB_DIR}: set MEDLEY_CUDA_LIBRARY")
    endif()
    set(MEDLEY_CUDA_STUB TRUE)
    if(NOT medley_FIND_QUIETLY)
      message(STATUS "medley: no CUDA driver found; linking the stub libcuda in \${MEDLEY_CUDA_STUB_DIR} (run with LD_LIBRARY_PATH=\${MEDLEY_CUDA_STUB_DIR} where no driver is installed; GPU calls then fail with CUDA error 34)")
    endif()
    # -L and -l, not the file's path: CMake puts no RPATH to the stub into
    # the program, which must load the real driver wherever there is one.
    set_target_properties(medley::cuda_driver PROPERTIES
      INTERFACE_LINK_OPTIONS "-L\${MEDLEY_CUDA_STUB_DIR}"
      INTERFACE_LINK_LIBRARIES "-lcuda")
  endif()
endif()

if(NOT TARGET medley::medley)
  add_library(medley::medley STATIC IMPORTED)
  set(_medley_libs $runtime_cmake)
  if(MEDLEY_HAS_CUDA)
    list(INSERT _medley_libs 0 medley::cuda_driver)
  endif()
  set_target_properties(medley::medley PROPERTIES
    IMPORTED_LOCATION "\${MEDLEY_STATIC_LIBRARY}"
    IMPORTED_LINK_INTERFACE_LANGUAGES "C"
    INTERFACE_INCLUDE_DIRECTORIES "\${MEDLEY_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "\${_medley_libs}")
  unset(_medley_libs)
endif()

if(NOT TARGET medley::medley_shared)
  add_library(medley::medley_shared SHARED IMPORTED)
  set_target_properties(medley::medley_shared PROPERTIES
    IMPORTED_LOCATION "\${MEDLEY_SHARED_LIBRARY}"
    IMPORTED_SONAME "$soname"
    INTERFACE_INCLUDE_DIRECTORIES "\${MEDLEY_INCLUDE_DIR}")
  if(MEDLEY_HAS_CUDA)
    # libmedley_ffi.so needs libcuda.so.1: given on the link line, the
    # linker resolves it (the stub included) like the static library's.
    set_target_properties(medley::medley_shared PROPERTIES INTERFACE_LINK_LIBRARIES medley::cuda_driver)
  endif()
endif()

if(NOT MEDLEY_HAS_CUDA)
  set_target_properties(medley::medley medley::medley_shared PROPERTIES INTERFACE_COMPILE_DEFINITIONS MEDLEY_NO_CUDA)
endif()

set(\${CMAKE_FIND_PACKAGE_NAME}_FOUND TRUE)
unset(_medley_prefix)
cmake_policy(POP)
EOF

pc_head="# medley $version (C ABI $abi_major.$abi_minor), the $build_name build (cargo profile $profile):
# generated by $me. Relocatable: paths are relative to this file.
prefix=\${pcfiledir}/../..
includedir=\${prefix}/include
libdir=\${prefix}/lib
cuda=$pc_cuda_var
abi_version=$abi_major.$abi_minor"
[ "$cuda" -eq 0 ] || pc_head="$pc_head
# Where no CUDA driver is installed: add -L\${stubdir} to link (and
# LD_LIBRARY_PATH=\${stubdir} to run) against the stub libcuda.
stubdir=\${libdir}/medley/stub"

cat >"$lib/pkgconfig/medley.pc" <<EOF
$pc_head

Name: medley
Description: medley C ABI (combining models), shared library libmedley_ffi.so ($build_name build)
Version: $version
URL: https://github.com/medley-rs/medley
Cflags: -I\${includedir}$pc_cflags
Libs: -L\${libdir} -lmedley_ffi$pc_cuda
Libs.private: $runtime
EOF
cat >"$lib/pkgconfig/medley-static.pc" <<EOF
$pc_head

Name: medley-static
Description: medley C ABI (combining models), static library libmedley_ffi.a ($build_name build)
Version: $version
URL: https://github.com/medley-rs/medley
Cflags: -I\${includedir}$pc_cflags
Libs: \${libdir}/libmedley_ffi.a$pc_cuda $runtime
EOF

echo "$me: medley $version (ABI $abi_major.$abi_minor, $build_name, profile $profile) installed to $prefix"
