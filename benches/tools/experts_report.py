#!/usr/bin/env python3
"""Expert-GEMM benchmark results beside the PyTorch baselines and the
issue's targets, as markdown.

Usage: python3 benches/tools/experts_report.py [CRITERION_DIR] [BASELINES_JSON] [BENCH_LOG]
(defaults: target/criterion, benches/baselines/pytorch-baselines-h100.json).
Reads the criterion estimates of `cuda/experts/*` (or, given BENCH_LOG,
the median of each "time: [lo median hi]" line of criterion's console
output) and the problem facts benches/benches/gpu_experts.rs writes to
CRITERION_DIR/cuda-experts-meta.json.
Weight GB/s counts the weight bytes of the experts the routing touched;
copy bandwidth is the baselines' measured device copy (read + write).
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
base_path = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "benches/baselines/pytorch-baselines-h100.json")
meta = {m["id"]: m for m in json.loads((root / "cuda-experts-meta.json").read_text())}
base = json.loads(base_path.read_text())
copy = base["copy_GBps"]
times = {}
for est in root.glob("cuda_experts_*/*/*/new/estimates.json"):
    bench = json.loads((est.parent / "benchmark.json").read_text())
    times[bench["full_id"]] = json.loads(est.read_text())["median"]["point_estimate"] / 1e3  # us
if len(sys.argv) > 3:
    unit = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
    last = None
    for line in pathlib.Path(sys.argv[3]).read_text().splitlines():
        if line.startswith("cuda/experts/") and " " not in line.strip():
            last = line.strip()
        elif last and line.strip().startswith("time:"):
            v = line.split("[")[1].split("]")[0].split()
            times[last] = float(v[2]) * unit[v[3]]
            last = None

VARIANTS = ["gemm1_mma", "gemm1_wgmma", "gemm2_mma", "gemm2_wgmma"]
print("| shape | T | " + " | ".join(f"{v} us (TFLOP/s, weight GB/s)" for v in VARIANTS)
      + " | torch loop us | torch._grouped_mm us | best vs grouped_mm |")
print("|---|---|" + "---|" * len(VARIANTS) + "---|---|---|")
for b in base["moe"]:
    name = "mixtral" if b["E"] == 8 else "deepseek"
    pid = f"{name}_T{b['T']}"
    m = meta.get(pid)
    if not m:
        continue
    cells, best = [], None
    for v in VARIANTS:
        us = times.get(f"cuda/experts/{pid}/{v}/bf16")
        if us is None:
            cells.append("-")
            continue
        best = us if best is None else min(best, us)
        cells.append(f"{us:.1f} ({m['flops'] / us / 1e6:.0f}, {m['weight_bytes'] / us / 1e3:.0f})")
    vs = f"{b['grouped_mm_us'] / best:.2f}x" if best else "-"
    print(f"| {name} | {b['T']} | " + " | ".join(cells) + f" | {b['loop_us']:.1f} | {b['grouped_mm_us']:.1f} | {vs} |")
print(f"\nCopy bandwidth (baselines): {copy:.0f} GB/s; 85% = {0.85 * copy:.0f} GB/s.")
