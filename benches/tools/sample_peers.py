#!/usr/bin/env python3
"""What an engine runs instead of medley's fused sampler, timed on the GPU.

Runs on the GPU machine (PyTorch + CUDA), beside `bench_main --bench
cuda/sample/` in the same device call. For the shapes of the criterion group
cuda/sample/M{2,8}_B{1,64,256}_V{32000,128256} (bf16 logits of M models),
it times the PyTorch pipeline an engine would write: combine the models
(log-linear: sum of c_m log_softmax(z_m); linear: logsumexp of
log w_m + log_softmax(z_m)), then pick the next token the way vLLM's v1
sampler does (greedy: argmax; temperature: softmax(s / t) / Exp(1) noise,
argmax; top-k: the k-th largest value as a threshold; top-p: a full sort,
cumulative softmax, mask), eager and under torch.compile, and, when the
package is importable, FlashInfer's sampling from the combined logits.

Inputs rotate over >= 120 MiB of sets like the criterion group (no L2
reuse between calls); each time is the mean over a burst of calls between
two CUDA events, median of 7 bursts. torch.compile runs for the V = 128256
corner shapes only unless SAMPLE_PEERS_COMPILE says otherwise (it compiles
once per shape).

Also measured: the read-only floor, `x.sum()` over 4 GiB of bf16 (bytes
read / time), so a sampler's time can be put against reading its inputs once.

Writes JSON to $OUT/sample-peers.json (or ./sample-peers.json) and prints a
table.
"""
import json
import os

import torch

dev = "cuda"
# torch.compile specializes per shape (minutes of compiling for all 12):
# SAMPLE_PEERS_COMPILE=all|none|<comma list of M{m}_B{b}_V{v}>, default the
# four corner shapes at V = 128256 (M 2 and 8, B 1 and 256).
COMPILE = os.environ.get("SAMPLE_PEERS_COMPILE", "M2_B1_V128256,M8_B1_V128256,M2_B256_V128256,M8_B256_V128256")
torch._dynamo.config.cache_size_limit = 64
ROTATE = 120 << 20


def burst(fn, sets, iters):
    s = torch.cuda.Event(enable_timing=True)
    e = torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(iters):
        fn(sets[i % len(sets)])
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e-3 / iters


def bench(fn, sets, iters=40):
    for i in range(5):
        fn(sets[i % len(sets)])
    torch.cuda.synchronize()
    ts = sorted(burst(fn, sets, iters) for _ in range(7))
    return ts[len(ts) // 2]


def read_floor():
    x = torch.randn(1 << 31, device=dev, dtype=torch.bfloat16)  # 4 GiB
    t = bench(lambda y: y.sum(), [x], iters=10)
    del x
    return (1 << 31) * 2 / t


def combine_loglinear(L, c):
    return (torch.log_softmax(L.float(), -1) * c[:, None, None]).sum(0)


def combine_linear(L, lw):
    return torch.logsumexp(torch.log_softmax(L.float(), -1) + lw[:, None, None], 0)


def greedy(s):
    return s.argmax(-1)


def temperature(s, t=0.8):
    p = torch.softmax(s / t, -1)
    q = torch.empty_like(p).exponential_()
    return (p / q).argmax(-1)


def top_k(s, k=50, t=0.8):
    s = s / t
    kth = s.topk(k, -1).values[:, -1:]
    s = s.masked_fill(s < kth, float("-inf"))
    p = torch.softmax(s, -1)
    q = torch.empty_like(p).exponential_()
    return (p / q).argmax(-1)


def top_p(s, p_=0.9, t=0.8):
    s = s / t
    srt, idx = s.sort(-1, descending=False)
    cum = torch.softmax(srt, -1).cumsum(-1)
    drop = cum <= 1 - p_
    drop[:, -1] = False
    srt = srt.masked_fill(drop, float("-inf"))
    s = torch.empty_like(s).scatter_(-1, idx, srt)
    p = torch.softmax(s, -1)
    q = torch.empty_like(p).exponential_()
    return (p / q).argmax(-1)


SAMPLERS = {"greedy": greedy, "temperature": temperature, "top_k50": top_k, "top_p0.9": top_p}


def flashinfer_samplers():
    try:
        import flashinfer.sampling as fs  # noqa
    except Exception as ex:  # noqa
        return None, f"flashinfer not importable: {str(ex)[:120]}"
    out = {}

    def fi_temp(s):
        return fs.sampling_from_logits(s / 0.8)

    def fi_topk(s):
        return fs.top_k_sampling_from_probs(torch.softmax(s / 0.8, -1), 50)

    def fi_topp(s):
        return fs.top_p_sampling_from_probs(torch.softmax(s / 0.8, -1), 0.9)

    out.update({"temperature": fi_temp, "top_k50": fi_topk, "top_p0.9": fi_topp})
    return out, None


def main():
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["read_floor_GBps"] = read_floor() / 1e9
    print(f"read floor (bf16 sum of 4 GiB): {res['read_floor_GBps']:.1f} GB/s")
    fi, why = flashinfer_samplers()
    res["flashinfer"] = why or "used"
    print("flashinfer:", res["flashinfer"])
    compiled = {}
    rows = []
    out = os.path.join(os.environ.get("OUT", "."), "sample-peers.json")
    for v in (32000, 128256):
        for b in (1, 64, 256):
            for m in (2, 8):
                n = m * b * v
                nsets = max(1, min(4096, -(-ROTATE // (n * 2))))
                sets = [torch.randn(m, b, v, device=dev, dtype=torch.bfloat16) * 8 for _ in range(nsets)]
                w = torch.log(torch.arange(1, m + 1, device=dev, dtype=torch.float32) / (m * (m + 1) / 2))
                c = torch.ones(m, device=dev)
                c[-1] = -0.5
                row = {"M": m, "B": b, "V": v, "input_bytes": n * 2,
                       "read_floor_us": n * 2 / (res["read_floor_GBps"] * 1e9) * 1e6}
                for mode, comb, arg in (("linear", combine_linear, w), ("loglinear", combine_loglinear, c)):
                    for name, f in SAMPLERS.items():
                        def pipeline(L, a, comb=comb, f=f):
                            return f(comb(L, a))
                        key = (mode, name)
                        if key not in compiled:
                            # one compiled function per pipeline; the weights
                            # are an argument, so each shape recompiles
                            # with its own (dynamic=False)
                            compiled[key] = torch.compile(pipeline, dynamic=False)
                        runs = [("eager", pipeline)]
                        if COMPILE == "all" or f"M{m}_B{b}_V{v}" in COMPILE.split(","):
                            runs.append(("compile", compiled[key]))
                        for tag, fn in runs:
                            try:
                                row[f"{mode}/{name}/{tag}_us"] = bench(lambda L, fn=fn, a=arg: fn(L, a), sets) * 1e6
                            except Exception as ex:  # noqa
                                row[f"{mode}/{name}/{tag}_err"] = str(ex)[:200]
                        if fi and name in fi:
                            def fin(L, comb=comb, arg=arg, g=fi[name]):
                                return g(comb(L, arg))
                            try:
                                row[f"{mode}/{name}/flashinfer_us"] = bench(fin, sets) * 1e6
                            except Exception as ex:  # noqa
                                row[f"{mode}/{name}/flashinfer_err"] = str(ex)[:200]
                rows.append(row)
                res["rows"] = rows
                with open(out, "w") as fh:  # after every shape: a timeout keeps what ran
                    json.dump(res, fh, indent=1)
                print("sample", {k: (round(x, 1) if isinstance(x, float) else x) for k, x in row.items()},
                      flush=True)
                del sets


if __name__ == "__main__":
    main()
