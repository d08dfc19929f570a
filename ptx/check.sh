#!/usr/bin/env bash
# Assembles every ptx/*.ptx with the ptxas of CUDA 13.0 (what the 580
# driver accepts: PTX .version <= 9.0) for sm_80 and sm_90, and for sm_90a
# when a file's header says "requires sm_90a". Installs that ptxas from PyPI
# (nvidia-cuda-nvcc, pinned) into target/ptxas-venv on first use; no CUDA
# toolkit needed. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/ptxas-venv
ptxas=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/ptxas 2>/dev/null | head -1 || true)
if [ -z "$ptxas" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet nvidia-cuda-nvcc==13.0.88
  ptxas=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/ptxas | head -1)
fi
"$ptxas" --version | tail -1
status=0
for f in ptx/*.ptx; do
  archs="sm_80 sm_90"
  grep -q "requires sm_90a" "$f" && archs="sm_90a"
  for a in $archs; do
    if "$ptxas" -arch="$a" "$f" -o /dev/null 2> >(grep -v "disabling ABI" >&2); then
      echo "ptxas $a ok: $f"
    else
      echo "ptxas $a FAILED: $f"
      status=1
    fi
  done
done
exit $status
