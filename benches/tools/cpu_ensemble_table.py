#!/usr/bin/env python3
"""The CPU ensemble table from criterion results: input logits per
second for each (M, B, V), mode and dtype, the memcpy ceiling measured in
the same group, and the targets (log-linear >= 2 G logits/s, linear >= 1 G).

Usage: python3 benches/tools/cpu_ensemble_table.py [target/criterion]
"""
import json
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
res = {}
for est in root.glob("**/new/estimates.json"):
    b = json.loads((est.parent / "benchmark.json").read_text())
    m = re.match(r"ensemble/M(\d+)_B(\d+)_V(\d+)/(.*)", b["full_id"])
    if not m:
        continue
    ns = json.loads(est.read_text())["median"]["point_estimate"]
    n = b["throughput"]["Elements"]
    res[(int(m[1]), int(m[2]), int(m[3]), m[4])] = n / ns  # G elements/s
shapes = sorted({k[:3] for k in res})
print("| M | B | V | memcpy | linear f32 | linear bf16 | log-linear f32 | log-linear bf16 |")
print("|---|---|---|---|---|---|---|---|")
def cell(v, target):
    if v is None:
        return "-"
    return f"{v:.2f}" + ("" if v >= target else " (below)")
for s in shapes:
    g = lambda k: res.get(s + (k,))
    print(f"| {s[0]} | {s[1]} | {s[2]} | {g('memcpy'):.2f} | {cell(g('linear/f32'), 1)} | {cell(g('linear/bf16'), 1)} "
          f"| {cell(g('loglinear/f32'), 2)} | {cell(g('loglinear/bf16'), 2)} |")
