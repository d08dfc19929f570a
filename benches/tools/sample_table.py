#!/usr/bin/env python3
"""Side-by-side table of the fused sampler against PyTorch, from one GPU run.

Usage: python3 benches/tools/sample_table.py BENCH_LOG PEERS_JSON

BENCH_LOG is the output of `bench_main --bench cuda/sample/` (criterion's
text: one `time: [lo median hi]` line per benchmark), PEERS_JSON the file
benches/tools/sample_peers.py wrote in the same device call. Prints one
markdown table per combination mode: medley's samplers, the plain
combination writing its rows, PyTorch eager / torch.compile, and the
read-only floor (input bytes / the measured read rate).
"""
import json
import re
import sys

UNIT = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}


def parse_bench(path):
    txt = open(path, encoding="utf-8").read()
    out = {}
    for m in re.finditer(r"^(cuda/sample/\S+)\n\s+time:\s+\[\S+ \S+ (\S+) (\S+)", txt, re.M):
        out[m.group(1)] = float(m.group(2)) * UNIT[m.group(3)]
    return out


def f(x):
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def main():
    bench = parse_bench(sys.argv[1])
    peers = json.load(open(sys.argv[2]))
    print(f"read floor {peers['read_floor_GBps']:.1f} GB/s (bf16 sum of 4 GiB, same run); "
          f"{peers['device']}, torch {peers['torch']}; flashinfer: {peers['flashinfer']}\n")
    for mode in ("loglinear", "linear"):
        print(f"#### {mode}\n")
        print("| M | B | V | floor | greedy | temp. | min-p | top-k | top-p | temp. (v1) | combine rows "
              "| eager greedy | eager temp. | eager top-k | eager top-p | compile temp. | compile top-p "
              "| temp. vs best peer | greedy / floor |")
        print("|" + "---|" * 19)
        for r in peers["rows"]:
            m, b, v = r["M"], r["B"], r["V"]
            key = f"cuda/sample/M{m}_B{b}_V{v}/{mode}/"
            g = lambda n: bench.get(key + n)
            p = lambda n: r.get(f"{mode}/{n}_us")
            peer_t = [x for x in (p("temperature/eager"), p("temperature/compile")) if x]
            ratio = min(peer_t) / g("temperature") if peer_t and g("temperature") else None
            print(f"| {m} | {b} | {v} | {f(r['read_floor_us'])} | {f(g('greedy'))} | {f(g('temperature'))} "
                  f"| {f(g('min_p0.1'))} | {f(g('top_k50'))} | {f(g('top_p0.9'))} | {f(g('temperature_v1'))} "
                  f"| {f(g('combine_rows'))} | {f(p('greedy/eager'))} | {f(p('temperature/eager'))} "
                  f"| {f(p('top_k50/eager'))} | {f(p('top_p0.9/eager'))} | {f(p('temperature/compile'))} "
                  f"| {f(p('top_p0.9/compile'))} | {ratio and f'{ratio:.1f}x' or '-'} "
                  f"| {f(g('greedy') / r['read_floor_us'])}x |")
        print()


if __name__ == "__main__":
    main()
