#!/usr/bin/env python3
"""Fidelity check: `medley merge` against mergekit on small synthetic Llama checkpoints.

For every method config below the script writes a mergekit YAML with `dtype: float32`
and `out_dtype: float32`, runs mergekit (on CPU) and `medley merge` on it, and compares
the two outputs tensor by tensor: same names, shapes and dtypes, and the relative error
||medley - mergekit|| / ||mergekit|| (in float64) of every tensor, against 1e-5.

It also checks, per method, that medley's output is a loadable checkpoint: safetensors
(names / shapes / dtypes as expected) and, when transformers is installed,
AutoModelForCausalLM.from_pretrained (no missing/unexpected/mismatched weights, finite
logits, and the logits' difference against mergekit's output on a fixed input).

Inputs (made with gen_checkpoints.py under --work): two sets, bf16 and f32, each a base
and three fine-tunes (base + N(0, 0.01), own seed each): hidden 64, intermediate 176,
5 layers, 4/2 heads, vocab 257 (odd sizes on purpose).

Random methods (dare_*, della*) draw their masks with different generators in the two
tools, so their density<1 rows are reported but marked "random masks differ (not
comparable element-wise)"; each also runs with density 1.0 (deterministic), which must
agree to 1e-5.

The Markdown record (--record) lists date, versions, machine, one row per (method, input
set) and mergekit's errors verbatim; the raw per-tensor numbers go to the same path with
a .json suffix.

Usage:
    python compare_mergekit.py [--medley target/release/medley] [--work /tmp/medley-compare]
        [--record merge/results/mergekit-agreement.md] [--methods linear,ties,...]
        [--sets bf16,f32] [--mergekit-only] [--tol 1e-5] [--keep] [--list]

    --mergekit-only   run only mergekit (checks that the configs and checkpoints work)
    --methods         comma-separated subset of the config names (see --list)
    --keep            keep the merged outputs under --work (default: delete after comparing)

Run it from the repository root (or pass --medley with an absolute path), with the
mergekit venv's python, e.g. /work/mkvenv/bin/python merge/tools/compare_mergekit.py
"""

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch
import yaml
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "gen_checkpoints.py")

SHAPE = dict(hidden=64, intermediate=176, layers=5, heads=4, kv_heads=2, vocab=257)
NOISE = 0.01
RANDOM_NOTE = "random masks differ (not comparable element-wise)"


# ---------------------------------------------------------------------------------------
# Method configs. Each entry: name -> dict(config=fn(paths) -> mergekit config dict,
# random=bool, check=optional boundary-tie check spec, note=optional text).
# paths: dict with keys base, ft1, ft2, ft3.
# ---------------------------------------------------------------------------------------

def _gta(method, density, extra=None, weights=(0.5, 0.4, 0.3)):
    def make(p):
        models = []
        for key, w in zip(("ft1", "ft2", "ft3"), weights):
            params = {"weight": w, "density": density}
            params.update(extra or {})
            models.append({"model": p[key], "parameters": params})
        return {"merge_method": method, "base_model": p["base"], "models": models}
    return make


def _slerp(t):
    def make(p):
        return {
            "merge_method": "slerp",
            "base_model": p["ft1"],
            "models": [{"model": p["ft1"]}, {"model": p["ft2"]}],
            "parameters": {"t": t},
        }
    return make


def _weighted(method, weights, base=False):
    def make(p):
        keys = ("ft1", "ft2", "ft3")[: len(weights)]
        cfg = {"merge_method": method,
               "models": [{"model": p[k], "parameters": {"weight": w}} for k, w in zip(keys, weights)]}
        if base:
            cfg["base_model"] = p["base"]
        return cfg
    return make


def _karcher(p):
    return {"merge_method": "karcher", "models": [{"model": p[k]} for k in ("ft1", "ft2", "ft3")]}


def _model_stock(p, keys=("ft1", "ft2", "ft3")):
    return {"merge_method": "model_stock", "base_model": p["base"],
            "models": [{"model": p[k]} for k in keys]}


def _sce(p):
    return {"merge_method": "sce", "base_model": p["base"],
            "models": [{"model": p[k]} for k in ("ft1", "ft2", "ft3")],
            "parameters": {"select_topk": 0.5}}


def _passthrough(p):
    # A frankenmerge: layers 0-2 of ft1 then layers 2-4 of ft2 (6 layers out).
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": p["ft1"], "layer_range": [0, 3]}]},
                       {"sources": [{"model": p["ft2"], "layer_range": [2, 5]}]}]}


def _ta_filter(p):
    # Per-model filter lists and a gradient inside a per-model parameter.
    return {"merge_method": "task_arithmetic", "base_model": p["base"],
            "models": [
                {"model": p["ft1"], "parameters": {
                    "weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.2}]}},
                {"model": p["ft2"], "parameters": {"weight": [0.1, 0.9]}},
                {"model": p["ft3"], "parameters": {
                    "weight": [{"filter": "self_attn", "value": [1.0, 0.0]}, {"value": 0.4}]}},
            ]}


METHODS = {
    "linear": dict(config=_weighted("linear", (0.3, 0.7))),
    "task_arithmetic": dict(config=_gta("task_arithmetic", 1.0, weights=(0.6, 0.4, 0.3))),
    "task_arithmetic_filter": dict(config=_ta_filter,
                                   note="per-model filter lists + a gradient in a per-model weight"),
    "ties": dict(config=_gta("ties", 0.5), check=("magnitude", 0.5)),
    "dare_ties": dict(config=_gta("dare_ties", 0.6), random=True),
    "dare_ties_d1": dict(config=_gta("dare_ties", 1.0), note="density 1.0: deterministic"),
    "dare_linear": dict(config=_gta("dare_linear", 0.6), random=True),
    "dare_linear_d1": dict(config=_gta("dare_linear", 1.0), note="density 1.0: deterministic"),
    "breadcrumbs": dict(config=_gta("breadcrumbs", 0.9, {"gamma": 0.01}),
                        check=("outliers", 0.9, 0.01)),
    "breadcrumbs_ties": dict(config=_gta("breadcrumbs_ties", 0.9, {"gamma": 0.01}),
                             check=("outliers", 0.9, 0.01)),
    "della": dict(config=_gta("della", 0.6, {"epsilon": 0.15}), random=True),
    "della_d1": dict(config=_gta("della", 1.0, {"epsilon": 0.15}), note="density 1.0: deterministic"),
    "della_linear": dict(config=_gta("della_linear", 0.6, {"epsilon": 0.15}), random=True),
    "della_linear_d1": dict(config=_gta("della_linear", 1.0, {"epsilon": 0.15}),
                            note="density 1.0: deterministic"),
    "slerp": dict(config=_slerp([0, 0.3, 0.7, 1]), note="t gradient [0, 0.3, 0.7, 1] over 5 layers"),
    "slerp_filter": dict(config=_slerp([{"filter": "self_attn", "value": 0.3},
                                        {"filter": "mlp", "value": 0.7}, {"value": 0.5}]),
                         note="t: filter list (self_attn 0.3, mlp 0.7, else 0.5)"),
    "nuslerp": dict(config=_weighted("nuslerp", (0.4, 0.6)), note="no base"),
    "nuslerp_base": dict(config=_weighted("nuslerp", (0.4, 0.6), base=True), note="with base (task vectors)"),
    "multislerp": dict(config=_weighted("multislerp", (0.2, 0.3, 0.5)), note="no base"),
    "multislerp_base": dict(config=_weighted("multislerp", (0.2, 0.3, 0.5), base=True),
                            note="with base (task vectors)"),
    "karcher": dict(config=_karcher),
    "model_stock": dict(config=_model_stock, check=("stock", ("ft1", "ft2", "ft3")),
                        note="independent noise: mean cosines near 0, about half negative"),
    "model_stock_shared": dict(config=lambda p: _model_stock(p, ("sh1", "sh2", "sh3")),
                               check=("stock", ("sh1", "sh2", "sh3")),
                               note="fine-tunes sharing a direction: mean cosines near 0.5"),
    "sce": dict(config=_sce, check=("sce", 0.5), note="select_topk 0.5"),
    "passthrough_slices": dict(config=_passthrough,
                               note="frankenmerge: ft1 layers [0,3) + ft2 layers [2,5) -> 6 layers"),
}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def machine_info():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram": mem, "os": platform.platform(),
            "python": platform.python_version()}


def version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def generate_inputs(work, sets, log):
    paths = {}
    for s in sets:
        root = os.path.join(work, "models", s)
        p = {k: os.path.join(root, k) for k in ("base", "ft1", "ft2", "ft3", "mid", "sh1", "sh2", "sh3")}
        paths[s] = p
        stamp = os.path.join(root, ".done")
        want = json.dumps({"shape": SHAPE, "noise": NOISE, "set": s, "shared": True})
        if os.path.exists(stamp) and open(stamp).read() == want:
            continue
        log(f"generating {s} checkpoints under {root}")
        dtype = {"bf16": "bf16", "f32": "f32"}[s]
        cmd = [sys.executable, GEN, "--out", p["base"], "--overwrite", "--quiet", "--dtype", dtype,
               "--seed", "0"]
        for key in ("hidden", "intermediate", "layers", "heads", "vocab"):
            cmd += [f"--{key}", str(SHAPE[key])]
        cmd += ["--kv-heads", str(SHAPE["kv_heads"])]
        subprocess.run(cmd, check=True)
        for i, key in enumerate(("ft1", "ft2", "ft3"), start=1):
            subprocess.run([sys.executable, GEN, "--out", p[key], "--like", p["base"], "--noise",
                            str(NOISE), "--seed", str(100 + i), "--overwrite", "--quiet"], check=True)
        # fine-tunes that share a direction: mid = base + noise, sh_i = mid + noise, so the
        # task vectors sh_i - base have pairwise cosines near 0.5 (Model Stock's regime)
        subprocess.run([sys.executable, GEN, "--out", p["mid"], "--like", p["base"], "--noise", str(NOISE),
                        "--seed", "200", "--overwrite", "--quiet"], check=True)
        for i, key in enumerate(("sh1", "sh2", "sh3"), start=1):
            subprocess.run([sys.executable, GEN, "--out", p[key], "--like", p["mid"], "--noise",
                            str(NOISE), "--seed", str(200 + i), "--overwrite", "--quiet"], check=True)
        with open(stamp, "w") as f:
            f.write(want)
    return paths


def run_cmd(cmd, timeout=900):
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -9, e.stdout or "", (e.stderr or "") + f"\n(killed after {timeout} s)"
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
    return {"cmd": cmd, "rc": rc, "wall_s": time.perf_counter() - t0, "stdout": out, "stderr": err}


def error_excerpt(text, lines=25):
    """The end of a traceback (drop progress-bar noise)."""
    keep = [l for l in text.splitlines() if l.strip() and "it/s]" not in l and "s/it]" not in l]
    return "\n".join(keep[-lines:])


def st_files(folder):
    idx = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            return [os.path.join(folder, n) for n in dict.fromkeys(json.load(f)["weight_map"].values())]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def load_folder(folder):
    """{name: tensor} (small models only) and {name: safetensors dtype string}."""
    tensors, dtypes = {}, {}
    for path in st_files(folder):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"{name} appears in two shards")
                tensors[name] = f.get_tensor(name)
                dtypes[name] = header[name]["dtype"]
    return tensors, dtypes


def rel_err(a, b):
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    diff = torch.linalg.vector_norm(a - b).item()
    ref = torch.linalg.vector_norm(b).item()
    max_abs = (a - b).abs().max().item() if a.numel() else 0.0
    if ref == 0.0:
        return (0.0 if diff == 0.0 else math.inf), max_abs
    return diff / ref, max_abs


def boundary_ties(check, ref_names, inputs):
    """Tensor names where a magnitude / variance selection has a tie at its cut-off.

    inputs: {"base": {name: t}, "ft1": ..., ...}. Ties at a cut-off make the kept set
    depend on how a sort breaks ties, so the two tools may legitimately differ there.
    """
    kind = check[0]
    tied = {}
    for name in ref_names:
        if name not in inputs["base"]:
            continue
        base = inputs["base"][name].to(torch.float32)
        deltas = [inputs[k][name].to(torch.float32) - base for k in ("ft1", "ft2", "ft3")]
        reasons = []
        if kind == "magnitude":
            density = check[1]
            for k, d in zip(("ft1", "ft2", "ft3"), deltas):
                n = d.numel()
                kk = max(1, int(density * n))
                if kk < n:
                    s = d.abs().reshape(-1).sort(descending=True).values
                    if s[kk - 1] == s[kk]:
                        reasons.append(k)
        elif kind == "outliers":
            density, gamma = check[1], check[2]
            for k, d in zip(("ft1", "ft2", "ft3"), deltas):
                n = d.numel()
                target, n_top = int(density * n), int(gamma * n)
                n_bot = max(0, n - target - n_top)
                s = d.abs().reshape(-1).sort().values
                cuts = [c for c in (n_bot, n_bot + target) if 0 < c < n]
                if any(s[c - 1] == s[c] for c in cuts):
                    reasons.append(k)
        elif kind == "sce":
            density = check[1]
            tv = torch.stack(deltas)
            var = tv.var(dim=0, unbiased=False).reshape(-1)
            kk = int(int(torch.count_nonzero(var)) * density)
            if 0 < kk < var.numel():
                s = var.abs().sort(descending=True).values
                if s[kk - 1] == s[kk]:
                    reasons.append("variance")
        if reasons:
            tied[name] = reasons
    return tied


def stock_cosines(keys, ref_names, inputs):
    """Model Stock's mean pairwise cosine of the (whole-tensor) task vectors, in float64."""
    res = {}
    for name in ref_names:
        base = inputs["base"][name].to(torch.float64).reshape(-1)
        deltas = [inputs[k][name].to(torch.float64).reshape(-1) - base for k in keys]
        cs = []
        for i, a in enumerate(deltas):
            for b in deltas[i + 1:]:
                cs.append(float((a @ b) / max(float(a.norm() * b.norm()), 1e-6)))
        res[name] = sum(cs) / len(cs)
    return res


def small_norm_tensors(ref, gamma):
    """Tensors where gamma * numel < 1: no outlier is removed (n_top == 0)."""
    return [n for n, t in ref.items() if int(gamma * t.numel()) == 0]


def transformers_check(folder, ref_folder=None):
    """Load with AutoModelForCausalLM; return a dict (ok, message, logits diff vs ref)."""
    try:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM
    except Exception as e:  # pragma: no cover
        return {"ok": None, "message": f"transformers not importable: {e}"}
    try:
        import logging as _logging
        _logging.getLogger("transformers").setLevel(_logging.ERROR)
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                           dtype=torch.float32)
        problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
            {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
        ids = torch.tensor([[1, 5, 9, 17, 100, SHAPE["vocab"] - 1, 2]])
        with torch.no_grad():
            logits = model(ids).logits
        finite = bool(torch.isfinite(logits).all())
        res = {"ok": (not problems) and finite, "loading_info": {k: list(map(str, v)) for k, v in problems.items()},
               "finite_logits": finite, "num_hidden_layers": model.config.num_hidden_layers}
        if ref_folder:
            ref_model = AutoModelForCausalLM.from_pretrained(ref_folder, dtype=torch.float32)
            with torch.no_grad():
                ref_logits = ref_model(ids).logits
            res["logits_max_abs_diff"] = (logits - ref_logits).abs().max().item()
            res["logits_rel_err"] = rel_err(logits, ref_logits)[0]
        res["message"] = "ok" if res["ok"] else f"problems: {res['loading_info']} finite={finite}"
        return res
    except Exception as e:
        return {"ok": False, "message": f"{type(e).__name__}: {e}"}


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return f"{x:.2e}"
    return str(x)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description="Compare medley merge with mergekit on small checkpoints",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--medley", default="target/release/medley")
    ap.add_argument("--work", default="/tmp/medley-compare")
    ap.add_argument("--record", default="merge/results/mergekit-agreement.md")
    ap.add_argument("--methods", help="comma-separated subset (default: all; see --list)")
    ap.add_argument("--sets", default="bf16,f32", help="input sets: bf16,f32 (default both)")
    ap.add_argument("--mergekit-only", action="store_true", help="skip medley")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=42, help="--random-seed passed to both tools")
    ap.add_argument("--keep", action="store_true", help="keep merged outputs")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers load check")
    ap.add_argument("--list", action="store_true", help="list the method configs and exit")
    args = ap.parse_args()

    if args.list:
        for name, m in METHODS.items():
            print(f"{name:24s} {'(random) ' if m.get('random') else ''}{m.get('note', '')}")
        return

    names = list(METHODS) if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        sys.exit(f"unknown method config(s): {unknown}; known: {list(METHODS)}")
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for s in sets:
        if s not in ("bf16", "f32"):
            sys.exit(f"unknown set {s!r} (bf16, f32)")

    medley = os.path.abspath(args.medley)
    if not args.mergekit_only:
        if not os.access(medley, os.X_OK):
            sys.exit(f"medley binary not found at {medley} (build: cargo build --release -p medley-merge), "
                     f"or use --mergekit-only")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    paths = generate_inputs(work, sets, log)
    input_cache = {}

    def inputs_of(s):
        if s not in input_cache:
            input_cache[s] = {k: load_folder(v)[0] for k, v in paths[s].items()}
        return input_cache[s]

    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mergekit": version("mergekit"), "torch": torch.__version__,
        "transformers": version("transformers"), "safetensors": version("safetensors"),
        "machine": machine_info(), "medley": None if args.mergekit_only else medley,
        "tol": args.tol, "shape": SHAPE, "noise": NOISE, "seed": args.seed,
        "mergekit_only": args.mergekit_only,
    }
    if not args.mergekit_only:
        meta["medley_mtime"] = datetime.datetime.fromtimestamp(os.path.getmtime(medley)).isoformat(
            timespec="seconds")
        v = run_cmd([medley, "--version"], timeout=30)
        meta["medley_version"] = (v["stdout"] or v["stderr"]).strip() if v["rc"] == 0 else None
    try:
        meta["git"] = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip()
    except OSError:
        meta["git"] = None

    rows = []
    for s in sets:
        for name in names:
            spec = METHODS[name]
            cfg = spec["config"](paths[s])
            cfg["dtype"] = "float32"
            cfg["out_dtype"] = "float32"
            rdir = os.path.join(work, "runs", s, name)
            shutil.rmtree(rdir, ignore_errors=True)
            os.makedirs(rdir)
            cfg_path = os.path.join(rdir, "config.yml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
            out_mk, out_md = os.path.join(rdir, "mergekit"), os.path.join(rdir, "medley")
            row = {"method": name, "set": s, "random": bool(spec.get("random")), "note": spec.get("note", ""),
                   "config": cfg}
            log(f"[{s}] {name}: mergekit ...")
            mk = run_cmd([sys.executable, "-m", "mergekit.scripts.run_yaml", cfg_path, out_mk,
                          "--no-copy-tokenizer", "--no-write-model-card", "--random-seed", str(args.seed),
                          "--device", "cpu", "--quiet"])
            row["mergekit"] = {"rc": mk["rc"], "wall_s": mk["wall_s"]}
            if mk["rc"] != 0:
                row["mergekit"]["error"] = error_excerpt(mk["stderr"] + mk["stdout"])
                log(f"  mergekit FAILED (rc {mk['rc']}):\n{row['mergekit']['error']}")
            if not args.mergekit_only:
                log(f"[{s}] {name}: medley ...")
                md = run_cmd([medley, "merge", cfg_path, out_md, "--random-seed", str(args.seed), "--quiet"])
                row["medley"] = {"rc": md["rc"], "wall_s": md["wall_s"]}
                if md["rc"] != 0:
                    row["medley"]["error"] = error_excerpt(md["stderr"] + md["stdout"])
                    log(f"  medley FAILED (rc {md['rc']}):\n{row['medley']['error']}")
            compare(row, spec, s, out_mk, out_md, args, inputs_of)
            if not args.no_transformers:
                tr = {}
                if mk["rc"] == 0:
                    tr["mergekit"] = transformers_check(out_mk)
                if not args.mergekit_only and row["medley"]["rc"] == 0:
                    tr["medley"] = transformers_check(out_md, out_mk if mk["rc"] == 0 else None)
                row["transformers"] = tr
            log(f"  -> {row['verdict']}  {row.get('summary', '')}")
            rows.append(row)
            if not args.keep:
                shutil.rmtree(out_mk, ignore_errors=True)
                shutil.rmtree(out_md, ignore_errors=True)

    write_record(args.record, meta, rows, args)


def compare(row, spec, s, out_mk, out_md, args, inputs_of):
    mk_ok = row["mergekit"]["rc"] == 0
    row["tensors"] = {}
    if not mk_ok:
        row["verdict"] = "mergekit error"
        if not args.mergekit_only and row["medley"]["rc"] == 0:
            row["verdict"] = "mergekit error (medley ran)"
        return
    ref, ref_dt = load_folder(out_mk)
    row["mergekit"]["tensors"] = len(ref)
    row["mergekit"]["dtypes"] = sorted(set(ref_dt.values()))
    with open(os.path.join(out_mk, "config.json")) as f:
        mk_cfg = json.load(f)
    row["mergekit"]["config_dtype"] = mk_cfg.get("dtype", mk_cfg.get("torch_dtype"))
    row["mergekit"]["num_hidden_layers"] = mk_cfg.get("num_hidden_layers")
    if spec.get("check"):
        row["boundary_ties"] = boundary_ties(spec["check"], list(ref), inputs_of(s))
    if args.mergekit_only:
        row["verdict"] = "mergekit ok"
        row["summary"] = f"{len(ref)} tensors, {row['mergekit']['dtypes']}"
        return
    if row["medley"]["rc"] != 0:
        row["verdict"] = "FAIL (medley error)"
        return
    try:
        out, out_dt = load_folder(out_md)
    except Exception as e:
        row["verdict"] = "FAIL (medley output unreadable)"
        row["medley"]["error"] = f"{type(e).__name__}: {e}"
        return
    acc = {"missing": sorted(set(ref) - set(out)), "extra": sorted(set(out) - set(ref)),
           "shape_mismatch": [], "dtype_mismatch": []}
    cfg_path = os.path.join(out_md, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            md_cfg = json.load(f)
        acc["config_num_hidden_layers"] = md_cfg.get("num_hidden_layers")
        acc["config_dtype"] = md_cfg.get("dtype", md_cfg.get("torch_dtype"))
        if md_cfg.get("num_hidden_layers") != mk_cfg.get("num_hidden_layers"):
            acc["config_mismatch"] = (f"num_hidden_layers {md_cfg.get('num_hidden_layers')} "
                                      f"!= mergekit {mk_cfg.get('num_hidden_layers')}")
    else:
        acc["config_mismatch"] = "no config.json"

    known = {}  # name -> reason excluded from the verdict
    if spec.get("check"):
        if spec["check"][0] == "stock":
            base_in = inputs_of(s)["base"]
            for n, c in stock_cosines(spec["check"][1], list(ref), inputs_of(s)).items():
                if c < 0:
                    same = n in out and torch.equal(out[n].to(torch.float32), base_in[n].to(torch.float32))
                    known[n] = (f"mean cosine {c:+.4f} < 0: mergekit extrapolates (t < 0), medley uses t = 0 "
                                f"(the base); medley output equals the base: {'yes' if same else 'NO'}")
        if spec["check"][0] == "outliers":
            for n in small_norm_tensors(ref, spec["check"][2]):
                known[n] = ("gamma*numel < 1 (n_top == 0): older mergekit zeroed such task vectors, "
                            "medley keeps the density largest")

    errs = []
    for name in ref:
        if name not in out:
            continue
        a, b = out[name], ref[name]
        t = {"shape": list(b.shape), "dtype_mergekit": ref_dt[name], "dtype_medley": out_dt[name]}
        if tuple(a.shape) != tuple(b.shape):
            acc["shape_mismatch"].append(f"{name}: medley {list(a.shape)} vs mergekit {list(b.shape)}")
            t["rel_err"] = None
        else:
            t["rel_err"], t["max_abs"] = rel_err(a, b)
        if out_dt[name] != ref_dt[name]:
            acc["dtype_mismatch"].append(f"{name}: medley {out_dt[name]} vs mergekit {ref_dt[name]}")
        if name in known:
            t["excluded"] = known[name]
        elif t["rel_err"] is not None:
            errs.append(t["rel_err"])
        row["tensors"][name] = t
    row["acceptance"] = acc
    structure_ok = not (acc["missing"] or acc["extra"] or acc["shape_mismatch"] or acc["dtype_mismatch"]
                        or acc.get("config_mismatch"))
    row["max_rel"] = max(errs) if errs else None
    row["median_rel"] = statistics.median(errs) if errs else None
    row["compared"] = len(errs)
    bad = sorted(n for n, t in row["tensors"].items()
                 if "excluded" not in t and t["rel_err"] is not None and t["rel_err"] > args.tol)
    row["bad_tensors"] = bad
    tie_expl = [n for n in bad if n in row.get("boundary_ties", {})]
    excluded_bad = sorted(n for n, t in row["tensors"].items()
                          if "excluded" in t and t["rel_err"] is not None and t["rel_err"] > args.tol)
    row["excluded_differing"] = excluded_bad
    notes = []
    if not structure_ok:
        verdict = "FAIL (structure)"
    elif row["random"]:
        verdict = "n/a (random)"
        notes.append(RANDOM_NOTE)
        notes.append(merged_delta_ratio(out, ref, inputs_of(s), row["config"]))
    elif not bad:
        verdict = "pass"
    elif tie_expl and len(tie_expl) == len(bad):
        verdict = "pass*"
        notes.append(f"{len(bad)} tensor(s) over tol all have ties at the top-k cut-off "
                     f"(sort order dependent): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    else:
        verdict = "FAIL"
        notes.append(f"{len(bad)} tensor(s) over {args.tol:g}: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    if known:
        same = [n for n in known if n not in excluded_bad]
        what = ("a negative mean cosine (medley t = 0)" if spec["check"][0] == "stock"
                else "gamma*numel < 1")
        notes.append(f"excluded {len(known)} tensor(s) with {what} "
                     f"({len(excluded_bad)} differ > tol, {len(same)} agree)")
        if spec["check"][0] == "stock":
            not_base = [n for n, r in known.items() if r.endswith("NO")]
            notes.append("medley gives exactly the base for all of them" if not not_base
                         else f"medley does NOT give the base for {len(not_base)}: {', '.join(not_base[:3])}")
    if not structure_ok:
        notes.append("; ".join(f"{k}: {v[:3] if isinstance(v, list) else v}" for k, v in acc.items()
                               if v and k not in ("config_num_hidden_layers", "config_dtype")))
    row["verdict"] = verdict
    row["notes"] = notes
    row["summary"] = f"max {fmt(row['max_rel'])} median {fmt(row['median_rel'])}"


def merged_delta_ratio(out, ref, inputs, cfg):
    """For random methods: median over tensors of ||medley - base|| / ||mergekit - base||."""
    base = inputs["base"]
    ratios = []
    for name, b in ref.items():
        if name in out and name in base and out[name].shape == b.shape:
            x = base[name].to(torch.float64)
            den = torch.linalg.vector_norm(b.to(torch.float64) - x).item()
            if den > 0:
                ratios.append(torch.linalg.vector_norm(out[name].to(torch.float64) - x).item() / den)
    if not ratios:
        return ""
    return (f"||medley-base||/||mergekit-base|| per tensor: median {statistics.median(ratios):.3f}, "
            f"min {min(ratios):.3f}, max {max(ratios):.3f}")


def write_record(path, meta, rows, args):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    json_path = os.path.splitext(path)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)

    m = meta["machine"]
    L = []
    L.append("# medley merge vs mergekit: agreement\n")
    L.append(f"Generated by `merge/tools/compare_mergekit.py` on {meta['date']}.\n")
    L.append(f"- mergekit {meta['mergekit']}, torch {meta['torch']}, transformers {meta['transformers']}, "
             f"safetensors {meta['safetensors']}, Python {m['python']}")
    L.append(f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM, {m['os']}")
    if meta.get("medley"):
        L.append(f"- medley: `{meta['medley']}` (built {meta.get('medley_mtime')}, "
                 f"`--version`: {meta.get('medley_version') or 'n/a'}), repository at {meta.get('git')}")
    else:
        L.append("- medley: not run (`--mergekit-only`)")
    L.append(f"- inputs: synthetic Llama checkpoints (gen_checkpoints.py), hidden {SHAPE['hidden']}, "
             f"intermediate {SHAPE['intermediate']}, {SHAPE['layers']} layers, heads {SHAPE['heads']}/"
             f"{SHAPE['kv_heads']}, vocab {SHAPE['vocab']}, untied lm_head; base + 3 fine-tunes "
             f"(base + N(0, {NOISE}), one seed each); sets: bf16 and f32 files")
    L.append(f"- every config has `dtype: float32` and `out_dtype: float32`; both tools got "
             f"`--random-seed {meta['seed']}`; mergekit ran on CPU with `--no-copy-tokenizer "
             f"--no-write-model-card`")
    L.append(f"- relative error per tensor: ||medley - mergekit||_2 / ||mergekit||_2 in float64; "
             f"tolerance {meta['tol']:g}\n")

    L.append("## Results\n")
    L.append("| method | inputs | tensors compared | max rel err | median rel err | verdict | notes |")
    L.append("|---|---|---|---|---|---|---|")
    for r in rows:
        notes = "; ".join([r.get("note", "")] + r.get("notes", [])).strip("; ")
        if r["mergekit"]["rc"] != 0:
            notes = ("mergekit failed (see below); " + notes).strip("; ")
        if r.get("medley", {}).get("rc", 0) != 0:
            notes = ("medley failed (see below); " + notes).strip("; ")
        L.append(f"| {r['method']} | {r['set']} | {r.get('compared', '-') if not args.mergekit_only else r['mergekit'].get('tensors', '-')} "
                 f"| {fmt(r.get('max_rel'))} | {fmt(r.get('median_rel'))} | {r['verdict']} | {notes} |")
    L.append("")
    L.append("Verdicts: `pass` = every compared tensor within tolerance, names/shapes/dtypes equal; "
             "`pass*` = the only tensors over tolerance have exact ties in |delta| (or variance) at the "
             "top-k cut-off, so which element is kept depends on the sort's tie-breaking; "
             "`n/a (random)` = random masks (DARE/DELLA at density < 1) come from different generators; "
             "see the density-1.0 rows for those methods.\n")

    if not args.mergekit_only:
        L.append("## medley output as a checkpoint\n")
        L.append("| method | inputs | safetensors names/shapes/dtypes | config.json layers | transformers load | "
                 "logits max abs diff vs mergekit |")
        L.append("|---|---|---|---|---|---|")
        for r in rows:
            acc = r.get("acceptance")
            if acc is None:
                st = "medley failed" if r.get("medley", {}).get("rc", 0) != 0 else "-"
                layers = "-"
            else:
                probs = [k for k in ("missing", "extra", "shape_mismatch", "dtype_mismatch") if acc[k]]
                st = "ok" if not probs else "; ".join(f"{k}: {acc[k][:3]}" for k in probs)
                layers = f"{acc.get('config_num_hidden_layers')}" + (
                    f" ({acc['config_mismatch']})" if acc.get("config_mismatch") else "")
            tr = r.get("transformers", {}).get("medley")
            trs = "-" if tr is None else ("ok" if tr.get("ok") else tr.get("message", "failed"))
            ld = "-" if tr is None or "logits_max_abs_diff" not in tr else fmt(tr["logits_max_abs_diff"])
            L.append(f"| {r['method']} | {r['set']} | {st} | {layers} | {trs} | {ld} |")
        L.append("")

    mk_tr = [(r["method"], r["set"], r["transformers"]["mergekit"]) for r in rows
             if r.get("transformers", {}).get("mergekit") and not r["transformers"]["mergekit"].get("ok")]
    if mk_tr:
        L.append("## mergekit outputs that transformers did not load cleanly\n")
        for meth, s, tr in mk_tr:
            L.append(f"- {meth} ({s}): {tr.get('message')}")
        L.append("")

    excluded = [(r["method"], r["set"], n, t) for r in rows for n, t in r.get("tensors", {}).items()
                if "excluded" in t]
    if excluded:
        L.append("## Tensors excluded from the verdict (known deliberate difference)\n")
        L.append("Breadcrumbs removes the `gamma` fraction of largest |delta| as outliers: "
                 "n_top = int(gamma * numel) is 0 for tensors under 1/gamma elements (the 64-element "
                 "norm weights at gamma 0.01). Old mergekit releases then zeroed the whole task vector "
                 "(an empty slice `[n_bot:-0]`); medley keeps the `density` largest. The installed mergekit "
                 "computes `n_bot = max(0, n - target - n_top)` and keeps `indices[n_bot:n_bot+target]`, "
                 "so it may agree; the rel err is listed either way.\n")
        L.append("Model Stock: t = N cos / (1 + (N - 1) cos) from the mean pairwise cosine of the task "
                 "vectors. mergekit does not guard a negative mean cosine (t < 0 extrapolates away from the "
                 "average, t is infinite at cos = -1/(N-1)); medley uses t = 0 there, i.e. the base "
                 "(documented in core/src/merge/stock.rs). Task vectors of independent noise have cosines "
                 "near 0, about half of them negative; `model_stock_shared` uses fine-tunes with cosines "
                 "near 0.5.\n")
        L.append("| method | inputs | tensor | numel | rel err | reason |")
        L.append("|---|---|---|---|---|---|")
        for meth, s, n, t in excluded:
            numel = 1
            for d in t["shape"]:
                numel *= d
            L.append(f"| {meth} | {s} | {n} | {numel} | {fmt(t.get('rel_err'))} | {t['excluded']} |")
        L.append("")

    ties = [(r["method"], r["set"], r["boundary_ties"]) for r in rows if r.get("boundary_ties")]
    if ties:
        L.append("## Ties at the top-k cut-off\n")
        L.append("Tensors where |delta| (ties, breadcrumbs) or the variance across task vectors (sce) has "
                 "two equal values on either side of the kept/dropped boundary; with bf16 inputs the deltas "
                 "are quantized, so such ties are common. Where a tool breaks them differently the "
                 "tensor differs in those few elements.\n")
        for meth, s, t in ties:
            L.append(f"- {meth} ({s}): {len(t)} tensor(s): {', '.join(sorted(t)[:6])}{' ...' if len(t) > 6 else ''}")
        L.append("")

    bad = [r for r in rows if r.get("bad_tensors") and not r["random"]]
    if bad:
        L.append("## Tensors over tolerance\n")
        for r in bad:
            items = ", ".join(f"{n} ({fmt(r['tensors'][n]['rel_err'])})" for n in r["bad_tensors"][:12])
            L.append(f"- {r['method']} ({r['set']}): {items}{' ...' if len(r['bad_tensors']) > 12 else ''}")
        L.append("")

    errs = [(r["method"], r["set"], "mergekit", r["mergekit"]["error"]) for r in rows if r["mergekit"].get("error")]
    errs += [(r["method"], r["set"], "medley", r["medley"]["error"]) for r in rows
             if r.get("medley", {}).get("error")]
    L.append("## Errors (verbatim)\n")
    if not errs:
        L.append("None.\n")
    for meth, s, tool, text in errs:
        L.append(f"### {tool}: {meth} ({s})\n")
        L.append("```")
        L.append(text)
        L.append("```\n")

    L.append("## Known deliberate differences (not failures)\n")
    L.append("- medley always computes in f32 (these configs set `dtype: float32` so mergekit does too).")
    L.append("- breadcrumbs / breadcrumbs_ties: tensors with gamma*numel < 1 (see above) are excluded "
             "from the verdict.")
    L.append("- model_stock: tensors whose mean task-vector cosine is negative are excluded (medley: t = 0, "
             "the base; mergekit: t < 0); the record checks that medley returns exactly the base there.")
    L.append("- TIES-family / SCE: ties in |delta| at the top-k cut-off can be broken differently "
             "(`pass*`); the f32 set has continuous deltas and should have none.")
    L.append("- DARE / DELLA at density < 1: different random generators; compared at density 1.0.")
    L.append("")
    L.append(f"Raw per-tensor numbers: `{os.path.basename(json_path)}`.")
    text = "\n".join(L) + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
