#!/usr/bin/env python3
"""PyTorch's short kernels replayed from CUDA graphs, beside medley's
`bf16_graph` / `v2_graph` criterion variants (run both in one device call).

The shapes of cuda/gating/E{e}_k{k}_T{t} (softmax -> topk -> renormalize,
bf16 router logits) and of the decode ensembles cuda/ensemble/M{m}_B{1,8}_V{v}
(linear: logsumexp of log w_m + log_softmax(z_m); log-linear:
log_softmax(sum c_m log_softmax(z_m))), and DeepSeek-V3 grouped routing at
E 256 (cuda/gating/E256_k8_T{t}/deepseek_v3: `grouped_gate`), eager and
torch.compile. Each
timing captures CALLS calls into one torch.cuda.CUDAGraph, inputs rotating
over the same sets as the criterion group (call i reads set i % sets,
>= 120 MB of sets where a set is large), and reports the replay time divided
by CALLS (median of 7 replays): PyTorch's own dispatch overhead is gone, as
in SGLang's measurements of its router.

Also: one empty-ish kernel (x.add_(1) on 4 bytes) per call, the floor of a
graph node on this machine.

Writes $OUT/graph-peers.json (or ./graph-peers.json) and prints a table.
"""
import json
import os

import torch

dev = "cuda"
ROTATE = 120 << 20
torch._dynamo.config.cache_size_limit = 256
# torch.compile specializes per shape (seconds each): GRAPH_PEERS_COMPILE=
# all|none|subset (default subset: gating at E 256, ensembles at M 2 and 8
# with V 128256).
COMPILE = os.environ.get("GRAPH_PEERS_COMPILE", "subset")
# GRAPH_PEERS_ONLY=gating: the gating rows only (no ensembles).


def compiled(kind, **shape):
    if COMPILE == "all":
        return True
    if COMPILE == "none":
        return False
    if kind == "gate":
        return shape["e"] == 256
    return shape["m"] in (2, 8) and shape["v"] == 128256


def graph_time(fn, sets, calls):
    """Seconds per call of fn over `calls` calls captured in one graph."""
    n = calls
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):  # warm-up (and torch.compile's first run) outside capture
            fn(sets[i % len(sets)])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            fn(sets[i % len(sets)])
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e-3 / n)
    ts.sort()
    del g
    return ts[3]


def topk_gate(lg, k):
    p = torch.softmax(lg.float(), -1)
    v, i = torch.topk(p, k, -1)
    return v / v.sum(-1, keepdim=True), i


def grouped_gate(lg, bias, k=8, n_group=8, topk_group=4, scale=2.5):
    """DeepSeek-V3 routing as PyTorch users write it (vLLM's grouped_topk
    algorithm): sigmoid scores, bias for selection, top-2-sum group scores,
    the best topk_group groups, top-k over their experts, weights the
    unbiased scores renormalized and scaled."""
    s = torch.sigmoid(lg.float())
    sel = s + bias
    t, e = sel.shape
    gs = sel.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(gs).scatter_(1, gs.topk(topk_group, dim=-1).indices, 1.0)
    keep = keep.repeat_interleave(e // n_group, dim=1)
    ids = sel.masked_fill(keep == 0, float("-inf")).topk(k, dim=-1).indices
    w = s.gather(1, ids)
    return w / w.sum(-1, keepdim=True) * scale, ids


def lin(L, w):
    lp = torch.log_softmax(L.float(), dim=-1)
    return torch.logsumexp(lp + torch.log(w)[:, None, None], dim=0)


def loglin(L, lam):
    lp = torch.log_softmax(L.float(), dim=-1)
    return torch.log_softmax((lp * lam[:, None, None]).sum(0), dim=-1)


def main():
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    x = torch.zeros(1, device=dev)
    res["empty_kernel_us"] = graph_time(lambda _: x.add_(1), [0], 1024) * 1e6
    print(f"one tiny kernel per graph node: {res['empty_kernel_us']:.2f} us")
    topk_c = torch.compile(topk_gate, dynamic=False)
    gate = []
    for e, k in ((8, 2), (64, 6), (128, 8), (256, 8)):
        for t in (1, 64, 1024, 16384):
            nsets = max(1, min(1024, -(-ROTATE // (t * e * 2))))
            sets = [torch.randn(t, e, device=dev, dtype=torch.bfloat16) for _ in range(nsets)]
            row = {"E": e, "k": k, "T": t, "eager_us": graph_time(lambda lg: topk_gate(lg, k), sets, 1024) * 1e6}
            if compiled("gate", e=e):
                row["compile_us"] = graph_time(lambda lg: topk_c(lg, k), sets, 1024) * 1e6
            gate.append(row)
            print("gate", {a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()})
            del sets
    res["gating"] = gate
    finish(res)  # each section is saved as it completes (a cut-short run keeps them)
    # DeepSeek-V3 grouped routing (E 256), as the medley benches' deepseek_v3
    # rows (a zero bias there too).
    grouped_c = torch.compile(grouped_gate, dynamic=False)
    bias = torch.zeros(256, device=dev)
    grp = []
    for t in (1, 64, 1024, 16384):
        nsets = max(1, min(1024, -(-ROTATE // (t * 256 * 2))))
        sets = [torch.randn(t, 256, device=dev, dtype=torch.bfloat16) for _ in range(nsets)]
        row = {"E": 256, "k": 8, "T": t}
        for name, fn in (("eager_us", grouped_gate), ("compile_us", grouped_c)):
            try:
                row[name] = graph_time(lambda lg: fn(lg, bias), sets, 1024) * 1e6
            except Exception as ex:  # a peer that fails is recorded, not fatal
                row[name.replace("_us", "_error")] = str(ex)[:200]
        grp.append(row)
        print("grouped", {a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()})
        del sets
    res["grouped"] = grp
    res["ensemble"] = []
    finish(res)
    if os.environ.get("GRAPH_PEERS_ONLY") == "gating":
        finish(res)
        return
    lin_c = torch.compile(lin, dynamic=False)
    loglin_c = torch.compile(loglin, dynamic=False)
    ens = []
    for m in (2, 4, 8):
        for b in (1, 8):
            for v in (32000, 128256):
                nsets = max(1, min(256, -(-ROTATE // (m * b * v * 2))))
                sets = [torch.randn(m, b, v, device=dev, dtype=torch.bfloat16) * 3 for _ in range(nsets)]
                w = torch.arange(1, m + 1, device=dev, dtype=torch.float32)
                w = w / w.sum()
                lam = torch.ones(m, device=dev)
                lam[-1] = -0.5
                row = {"M": m, "B": b, "V": v}
                for name, fn, arg in (("linear", lin, w), ("loglinear", loglin, lam)):
                    row[name + "_eager_us"] = graph_time(lambda L: fn(L, arg), sets, 256) * 1e6
                for name, fn, arg in (("linear", lin_c, w), ("loglinear", loglin_c, lam)):
                    if compiled("ens", m=m, v=v):
                        row[name + "_compile_us"] = graph_time(lambda L: fn(L, arg), sets, 256) * 1e6
                ens.append(row)
                print("ens", {a: (round(b_, 2) if isinstance(b_, float) else b_) for a, b_ in row.items()})
                del sets
    res["ensemble"] = ens
    finish(res)


def finish(res):
    path = os.path.join(os.environ.get("OUT", "."), "graph-peers.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
