#!/usr/bin/env python3
"""Prints the graph-replay tables of benches/results/graph-replay.md from one
GPU call: DIR/medley.json (criterion medians in us, as
tools/device/graph_and_gating.sh writes it) and DIR/graph-peers.json
(benches/tools/graph_peers.py). Usage: graph_table.py DIR
Columns that the run did not measure (torch.compile outside its subset,
variants an older binary lacks) print as "-". "medley" is the default
kernel (GateKernel::Auto); v2 and v3 are the forced kernels of the same
run, back to back and replayed from graphs.
"""
import json
import sys


def fmt(x):
    return "-" if x is None else "%.2f" % x


def pair(m, b, suffix):
    return f"{fmt(m.get(b + 'bf16_v2' + suffix))} / {fmt(m.get(b + 'bf16_v3' + suffix))}"


def main():
    d = sys.argv[1]
    m = json.load(open(f"{d}/medley.json"))
    p = json.load(open(f"{d}/graph-peers.json"))
    print("| E | k | T | medley back-to-back (us) | medley graph (us) | v2 / v3 back-to-back (us) | v2 / v3 graph (us) | target (graph) | met | PyTorch eager in a graph (us) | torch.compile in a graph (us) | best PyTorch graph / medley graph |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in p["gating"]:
        e, k, t = r["E"], r["k"], r["T"]
        b = f"cuda/gating/E{e}_k{k}_T{t}/topk_softmax/"
        g = m.get(b + "bf16_graph")
        best = min(x for x in (r.get("eager_us"), r.get("compile_us")) if x)
        tgt = 3.0 if t <= 1024 else (12.0 if e == 256 else None)
        met = "-" if tgt is None or g is None else ("yes" if g <= tgt else "no, %.2fx" % (g / tgt))
        ratio = "-" if g is None else "%.1fx" % (best / g)
        print(f"| {e} | {k} | {t} | {fmt(m.get(b + 'bf16'))} | {fmt(g)} | {pair(m, b, '')} | {pair(m, b, '_graph')} | {tgt or '-'} | {met} | {fmt(r['eager_us'])} | {fmt(r.get('compile_us'))} | {ratio} |")
    print()
    print("| T | medley back-to-back (us) | medley graph (us) | v2 / v3 back-to-back (us) | v2 / v3 graph (us) | target (graph) | met | PyTorch eager in a graph (us) | torch.compile in a graph (us) |")
    print("|---|---|---|---|---|---|---|---|---|")
    peers = {r["T"]: r for r in p.get("grouped", [])}
    for t in (1, 64, 1024, 16384):
        b = f"cuda/gating/E256_k8_T{t}/deepseek_v3/"
        g = m.get(b + "bf16_graph")
        tgt = 4.0 if t <= 1024 else None
        met = "-" if tgt is None or g is None else ("yes" if g <= tgt else "no, %.2fx" % (g / tgt))
        pr = peers.get(t, {})
        print(f"| {t} | {fmt(m.get(b + 'bf16'))} | {fmt(g)} | {pair(m, b, '')} | {pair(m, b, '_graph')} | {tgt or '-'} | {met} | {fmt(pr.get('eager_us'))} | {fmt(pr.get('compile_us'))} |")
    print()
    print("| M | B | V | mode | medley back-to-back (us) | medley graph (us) | <= 5 us (V 128256) | PyTorch eager in a graph (us) | torch.compile in a graph (us) | best PyTorch graph / medley graph |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in p.get("ensemble", []):
        mm, bb, v = r["M"], r["B"], r["V"]
        for mode in ("linear", "loglinear"):
            b = f"cuda/ensemble/M{mm}_B{bb}_V{v}/{mode}/"
            g = m.get(b + "v2_graph")
            ce = r.get(mode + "_compile_us")
            best = min(x for x in (r[mode + "_eager_us"], ce) if x)
            met = "-" if v != 128256 or g is None else ("yes" if g <= 5 else "no, %.2fx" % (g / 5))
            ratio = "-" if g is None else "%.2fx" % (best / g)
            print(f"| {mm} | {bb} | {v} | {mode} | {fmt(m.get(b + 'v2'))} | {fmt(g)} | {met} | {fmt(r[mode + '_eager_us'])} | {fmt(ce)} | {ratio} |")


if __name__ == "__main__":
    main()
