#!/usr/bin/env python3
"""Markdown tables of the GPU benchmarks next to their floors, targets and
the PyTorch baselines measured on the same GPU model.

Usage: python3 benches/tools/gpu_report.py CRITERION_DIR BASELINES_JSON

CRITERION_DIR is a criterion output directory (target/criterion) holding
the cuda/ensemble and cuda/gating groups; BASELINES_JSON is the PyTorch
baseline file (pytorch-baselines-h100.json). Times are criterion medians
of back-to-back launches timed with CUDA events.
"""
import json
import pathlib
import sys

COPY_TBS = 3.0  # measured device copy, TB/s (read + write)


def load(root):
    res = {}
    for est in pathlib.Path(root).glob("**/new/estimates.json"):
        bench = json.loads((est.parent / "benchmark.json").read_text())
        res[bench["full_id"]] = json.loads(est.read_text())["median"]["point_estimate"] / 1e3  # us
    return res


def main():
    res = load(sys.argv[1])
    base = json.loads(pathlib.Path(sys.argv[2]).read_text())
    print("### Fused ensemble softmax (bf16 logits in, f32 log-probabilities out)\n")
    print("| M | B | V | mode | medley v2 (us) | effective TB/s | floor (us) | PyTorch eager (us) | torch.compile (us) | vs best PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in base["ensemble"]:
        m, b, v = e["M"], e["B"], e["V"]
        nbytes = m * b * v * 2 + b * v * 4
        for mode, key in (("linear", "lin"), ("loglinear", "loglin")):
            us = res.get(f"cuda/ensemble/M{m}_B{b}_V{v}/{mode}/v2")
            if us is None:
                continue
            best = min(e[f"{key}_eager_us"], e[f"{key}_compile_us"])
            print(f"| {m} | {b} | {v} | {mode} | {us:.1f} | {nbytes / us / 1e6:.2f} | {nbytes / (COPY_TBS * 1e6):.1f} | "
                  f"{e[f'{key}_eager_us']:.0f} | {e[f'{key}_compile_us']:.0f} | {best / us:.1f}x |")
    print("\n### Cost of the per-row uncertainty outputs (same call, all applicable outputs requested)\n")
    print("| M | B | V | mode | version | plain (us) | with uncertainty (us) | overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(k for k in res if k.startswith("cuda/ensemble/") and "+unc/" in k):
        shape, mode_unc, ver = key.split("/")[2:5]
        plain = res.get(key.replace("+unc/", "/"))
        if plain is None:
            continue
        m, b, v = (int(x[1:]) for x in shape.split("_"))
        us = res[key]
        print(f"| {m} | {b} | {v} | {mode_unc.split('+')[0]} | {ver} | {plain:.1f} | {us:.1f} | {100 * (us / plain - 1):+.1f}% |")
    print("\n### Top-k gating (bf16 router logits; ids u32 and weights f32 out)\n")
    print("| E | k | T | variant | medley (us) | effective GB/s | gate_topk v1 (us) | PyTorch eager (us) | torch.compile (us) | vs best PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for g in base["gating"]:
        e, k, t = g["E"], g["k"], g["T"]
        nbytes = t * e * 2 + t * k * 8
        for variant in ("topk_softmax", "deepseek_v3"):
            us = res.get(f"cuda/gating/E{e}_k{k}_T{t}/{variant}/bf16")
            if us is None:
                continue
            best = min(g["eager_us"], g["compile_us"])
            v1 = res.get(f"cuda/gating/E{e}_k{k}_T{t}/{variant}/bf16_v1")
            v1s = "-" if v1 is None else f"{v1:.2f}"
            print(f"| {e} | {k} | {t} | {variant} | {us:.2f} | {nbytes / us / 1e3:.0f} | {v1s} | {g['eager_us']:.0f} | "
                  f"{g['compile_us']:.0f} | {best / us:.1f}x |")


if __name__ == "__main__":
    main()
