#!/usr/bin/env python3
"""Prints criterion results (target/criterion) as a markdown table.

Usage: python3 benches/tools/table.py [REGEX]   (run from the repo root)

One row per benchmark: id, median time per iteration, and throughput
(elements/s or bytes/s) when the benchmark declared one. Only benchmarks
whose id matches REGEX are shown.
"""
import json
import pathlib
import re
import sys


def fmt_time(ns):
    for unit, div in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= div:
            return f"{ns / div:.3g} {unit}"
    return f"{ns:.3g} ns"


def fmt_rate(x, unit):
    for p, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g} {p}{unit}/s"
    return f"{x:.3g} {unit}/s"


def main():
    pat = re.compile(sys.argv[1] if len(sys.argv) > 1 else ".")
    root = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "target/criterion")
    rows = []
    for est in sorted(root.glob("**/new/estimates.json")):
        bench = json.loads((est.parent / "benchmark.json").read_text())
        bid = bench["full_id"]
        if not pat.search(bid):
            continue
        ns = json.loads(est.read_text())["median"]["point_estimate"]
        tp = bench.get("throughput") or {}
        rate = ""
        if "Elements" in tp:
            rate = fmt_rate(tp["Elements"] / (ns * 1e-9), "elem")
        elif "Bytes" in tp:
            rate = fmt_rate(tp["Bytes"] / (ns * 1e-9), "B")
        rows.append((bid, fmt_time(ns), rate))
    print("| benchmark | median time | throughput |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
