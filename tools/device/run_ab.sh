#!/usr/bin/env bash
# Runs on the GPU machine: the benchmarks matching FILTER with the PTX at REV
# (.device/var/rev, tools/device/build_ab.sh) and the embedded PTX of
# .device/bench_main ("base" in run_variants.sh's table: the working tree's,
# i.e. the head side), alternating over two rounds; one table of medians (us),
# each with its ratio to REV's. Logs and estimates go to $OUT when set.
set -u
filter=${1:?usage: run_ab.sh FILTER}
exec "$(dirname "$0")/run_variants.sh" "$filter" 2 rev base
