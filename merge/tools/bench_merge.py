#!/usr/bin/env python3
"""Benchmark `medley merge` against mergekit on Llama-shaped synthetic checkpoints.

The script generates (with gen_checkpoints.py, under --work) a base model of about
--target-params parameters and two fine-tunes of it (base + N(0, 0.01)), then runs both
tools on the same mergekit YAML configs:

    linear            ft1, ft2 with weight 0.5 each
    task_arithmetic   base + ft1, ft2, weight 0.5 each
    ties              base + ft1, ft2, density 0.5, weight 0.5
    dare_ties         base + ft1, ft2, density 0.5, weight 0.5
    slerp             ft1 (base_model) and ft2, t 0.5

in the checkpoints' dtype (bf16 by default) with no dtype override, i.e. mergekit's usual
run: `python -m mergekit.scripts.run_yaml CONFIG OUT --no-copy-tokenizer
--no-write-model-card` on CPU with its default threads, and `medley merge CONFIG OUT`.

For each run it measures wall time, CPU time (user + sys) and peak RSS (ru_maxrss, KiB)
of the child process, taken with os.wait4. Before every run the input files are read
once (cat > /dev/null) so that both tools start with a warm page cache (only meaningful
when the inputs fit in RAM next to the merge; the record says whether they do). A
mergekit run that passes --mergekit-timeout is killed and recorded as "killed after N s
(did not finish)" with the last progress seen on its progress bar. Each output folder is
deleted after its run (its size and tensor count are recorded first).

The Markdown table goes to stdout and to --record; the raw numbers to the same path
with a .json suffix.

Usage:
    python bench_merge.py [--target-params 1e9] [--preset NAME] [--work /work/bench-data]
        [--medley target/release/medley] [--record merge/results/merge-bench.md]
        [--configs linear,task_arithmetic,ties,dare_ties,slerp] [--repeat 1]
        [--mergekit-timeout 1800] [--medley-timeout 3600] [--threads N] [--dtype bf16]
        [--shard-size 5GB] [--skip-mergekit] [--skip-medley] [--clean-inputs]
    python bench_merge.py --sizes 2e8,1e9 --preset tinyllama [--configs linear,ties] ...
        medley alone at each size (peak RSS vs model size); with --preset only the layer
        count changes between sizes, without it the shape family may change too

Examples:
    # smoke test (about 50M parameters, a minute or two)
    python merge/tools/bench_merge.py --target-params 5e7 --record /tmp/bench-smoke.md
    # the real run on a big machine: Llama-3.2-3B shape
    python merge/tools/bench_merge.py --preset llama3b --work /data/bench
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "gen_checkpoints.py")
sys.path.insert(0, HERE)
import gen_checkpoints as gen  # noqa: E402  (shapes and parameter counts only)

NOISE = 0.01


def configs(p):
    """name -> mergekit config dict, for the model folders p (base, ft1, ft2)."""
    def gta(method, density):
        models = [{"model": p[k], "parameters": {"weight": 0.5, **({"density": density} if density else {})}}
                  for k in ("ft1", "ft2")]
        return {"merge_method": method, "base_model": p["base"], "models": models}
    return {
        "linear": {"merge_method": "linear",
                   "models": [{"model": p["ft1"], "parameters": {"weight": 0.5}},
                              {"model": p["ft2"], "parameters": {"weight": 0.5}}]},
        "task_arithmetic": gta("task_arithmetic", None),
        "ties": gta("ties", 0.5),
        "dare_ties": gta("dare_ties", 0.5),
        "slerp": {"merge_method": "slerp", "base_model": p["ft1"],
                  "models": [{"model": p["ft1"]}, {"model": p["ft2"]}], "parameters": {"t": 0.5}},
    }


CONFIG_NOTES = {
    "linear": "2 models, weight 0.5 each",
    "task_arithmetic": "base + 2, weight 0.5",
    "ties": "base + 2, density 0.5, weight 0.5",
    "dare_ties": "base + 2, density 0.5, weight 0.5",
    "slerp": "2 models, t 0.5",
}


# ---------------------------------------------------------------------------------------

def machine_info(work):
    info = {"nproc": os.cpu_count(), "cpu": "unknown", "ram": "unknown", "os": platform.platform(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["ram_bytes"] = int(line.split()[1]) * 1024
                    info["ram"] = f"{info['ram_bytes'] / 2**30:.1f} GiB"
                    break
    except OSError:
        pass
    st = shutil.disk_usage(work)
    info["disk"] = f"{work}: {st.total / 1e9:.0f} GB total, {st.free / 1e9:.0f} GB free"
    try:
        dev = subprocess.run(["df", "--output=source,fstype", work], capture_output=True, text=True).stdout
        info["disk"] += " (" + " ".join(dev.split()[2:]) + ")"
    except OSError:
        pass
    return info


def version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def human_bytes(n):
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def folder_files(folder):
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def folder_bytes(folder):
    return sum(os.path.getsize(f) for f in folder_files(folder))


def folder_tensor_count(folder):
    n = 0
    for path in folder_files(folder):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        n += sum(1 for k in header if k != "__metadata__")
    return n


def shape_for(args, target):
    if target:
        preset, s = gen.shape_for_target(target, args.preset)
    else:
        preset = args.preset
        s = dict(gen.PRESETS[preset])
    return preset, s


def ensure_inputs(work, preset, shape, args, log):
    """Generate base/ft1/ft2 under work/<tag>/ unless they exist with the same shape."""
    n = gen.param_count(shape)
    tag = f"{preset}-L{shape['layers']}-{n / 1e9:.3f}B-{args.dtype}"
    root = os.path.join(work, tag)
    paths = {k: os.path.join(root, k) for k in ("base", "ft1", "ft2")}
    stamp = os.path.join(root, ".done")
    want = json.dumps({"shape": shape, "dtype": args.dtype, "noise": NOISE, "shard": args.shard_size})
    if os.path.exists(stamp) and open(stamp).read() == want:
        log(f"reusing inputs in {root}")
        return root, paths
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    t0 = time.time()
    log(f"generating {n:,} parameter models ({preset}, {shape}) under {root}")
    cmd = [sys.executable, GEN, "--out", paths["base"], "--dtype", args.dtype, "--shard-size", args.shard_size,
           "--seed", "0", "--quiet"]
    for key in ("hidden", "intermediate", "layers", "heads", "vocab"):
        cmd += [f"--{key}", str(shape[key])]
    cmd += ["--kv-heads", str(shape["kv_heads"])]
    subprocess.run(cmd, check=True)
    for i, k in enumerate(("ft1", "ft2"), start=1):
        subprocess.run([sys.executable, GEN, "--out", paths[k], "--like", paths["base"], "--noise", str(NOISE),
                        "--seed", str(i), "--shard-size", args.shard_size, "--quiet"], check=True)
    with open(stamp, "w") as f:
        f.write(want)
    log(f"generated in {time.time() - t0:.0f} s")
    return root, paths


def warm_cache(folders):
    files = [f for d in folders for f in folder_files(d)]
    subprocess.run(["cat"] + files, stdout=subprocess.DEVNULL, check=True)


PROGRESS_RE = re.compile(r"(\d+)/(\d+) \[")


def last_progress(text):
    """Last 'N/M [' of a tqdm bar (mergekit's 'Executing graph')."""
    found = PROGRESS_RE.findall(text.replace("\r", "\n"))
    if not found:
        return None
    done, total = found[-1]
    return f"{done}/{total} tasks ({100 * int(done) / max(1, int(total)):.0f}%)"


def measured_run(cmd, log_path, timeout):
    """Run cmd; return wall, cpu (user+sys), peak RSS (KiB), rc, killed, via os.wait4.

    Peak RSS comes from /usr/bin/time (GNU time, %M) wrapped around the command: a child
    forked from this Python process inherits its high-water RSS across exec (Linux keeps
    ru_maxrss through execve), so wait4's ru_maxrss of a direct child is at least this
    script's own RSS (about 0.5 GiB once torch is imported). GNU time is small when it
    forks the measured command, so its %M is the command's own peak.
    """
    # Write back what earlier runs left dirty, so one run's writeback does not land in the next.
    os.sync()
    time.sleep(1)
    rss_file = str(log_path) + ".rss"
    if os.path.exists("/usr/bin/time"):
        cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file] + list(cmd)
    with open(log_path, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid != 0:
                break
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    with open(log_path, errors="replace") as f:
        output = f.read()
    maxrss = ru.ru_maxrss
    try:
        with open(rss_file) as f:
            maxrss = int(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        pass  # killed before time wrote it: keep wait4's (an upper bound)
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "maxrss_kib": maxrss, "rc": proc.returncode, "killed": killed,
            "progress": last_progress(output) if killed else None,
            "output_tail": "\n".join(l for l in output.replace("\r", "\n").splitlines()[-15:] if l.strip())}


def run_tool(tool, cfg_path, out, paths_used, args, log):
    shutil.rmtree(out, ignore_errors=True)
    warm_cache(paths_used)
    if tool == "medley":
        cmd = [os.path.abspath(args.medley), "merge", cfg_path, out]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += args.medley_arg
        timeout = args.medley_timeout
    else:
        cmd = [args.mergekit_python, "-m", "mergekit.scripts.run_yaml", cfg_path, out,
               "--no-copy-tokenizer", "--no-write-model-card"] + args.mergekit_arg
        timeout = args.mergekit_timeout
    log(f"  {tool}: {' '.join(cmd)}")
    r = measured_run(cmd, out.rstrip("/") + f".{tool}.log", timeout)
    r["cmd"] = cmd
    if r["rc"] == 0 and os.path.isdir(out):
        r["out_bytes"] = folder_bytes(out)
        r["out_tensors"] = folder_tensor_count(out)
    shutil.rmtree(out, ignore_errors=True)
    status = "ok" if r["rc"] == 0 else (f"killed after {timeout:g} s" if r["killed"] else f"rc {r['rc']}")
    log(f"    {status}: wall {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s, peak RSS {human_bytes(r['maxrss_kib'] * 1024)}")
    if r["rc"] != 0 and not r["killed"]:
        log("    " + r["output_tail"].replace("\n", "\n    "))
    return r


def summarize(runs):
    """Median over repeats of each measure (runs that finished only)."""
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return None
    return {k: statistics.median(r[k] for r in ok) for k in ("wall_s", "cpu_s", "maxrss_kib")}


def cell_status(runs, timeout):
    bad = [r for r in runs if r["rc"] != 0]
    if not bad:
        return None
    r = bad[0]
    if r["killed"]:
        prog = f", progress {r['progress']}" if r.get("progress") else ""
        return f"killed after {timeout:g} s (did not finish{prog})"
    return f"failed (rc {r['rc']})"


def fmt_s(x):
    return "-" if x is None else f"{x:.1f}"


def fmt_rss(kib):
    return "-" if kib is None else human_bytes(kib * 1024)


# ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description="Benchmark medley merge vs mergekit",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--target-params", "--params", type=gen.parse_count,
                    help="model size (default 1e9, or the preset's own size when --preset is given)")
    ap.add_argument("--preset", choices=sorted(gen.PRESETS),
                    help="shape: alone, the preset's exact shape; with --target-params, its layer count scaled")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--shard-size", default="5GB", help="input shard size (default 5GB)")
    ap.add_argument("--work", default="/work/bench-data")
    ap.add_argument("--medley", default="target/release/medley")
    ap.add_argument("--mergekit-python", default=sys.executable)
    ap.add_argument("--record", default="merge/results/merge-bench.md")
    ap.add_argument("--configs", default="linear,task_arithmetic,ties,dare_ties,slerp")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--mergekit-timeout", type=float, default=1800)
    ap.add_argument("--medley-timeout", type=float, default=3600)
    ap.add_argument("--threads", type=int, help="medley --threads (default: medley's default)")
    ap.add_argument("--medley-arg", action="append", default=[], help="extra medley argument (repeatable)")
    ap.add_argument("--mergekit-arg", action="append", default=[], help="extra mergekit argument (repeatable)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-medley", action="store_true")
    ap.add_argument("--sizes", help="comma-separated sizes: run medley alone at each (RSS vs size)")
    ap.add_argument("--clean-inputs", action="store_true", help="delete generated inputs at the end")
    args = ap.parse_args()

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIG_NOTES]
    if unknown:
        sys.exit(f"unknown config(s) {unknown}; known: {list(CONFIG_NOTES)}")
    if args.sizes:
        args.skip_mergekit = True
    if not args.skip_medley and not os.access(os.path.abspath(args.medley), os.X_OK):
        sys.exit(f"medley binary not found at {args.medley} (cargo build --release -p medley-merge), "
                 f"or use --skip-medley")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(work), "mergekit": version("mergekit"), "torch": version("torch"),
            "transformers": version("transformers"), "dtype": args.dtype, "repeat": args.repeat,
            "mergekit_timeout": args.mergekit_timeout, "threads": args.threads, "noise": NOISE}
    if not args.skip_medley:
        v = subprocess.run([os.path.abspath(args.medley), "--version"], capture_output=True, text=True)
        meta["medley_version"] = v.stdout.strip() if v.returncode == 0 else None
        meta["medley"] = os.path.abspath(args.medley)
        meta["medley_mtime"] = datetime.datetime.fromtimestamp(
            os.path.getmtime(meta["medley"])).isoformat(timespec="seconds")
    try:
        import torch
        meta["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    meta["git"] = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip() or None

    if args.target_params is None and not args.preset:
        args.target_params = 1e9
    if not args.skip_mergekit:
        # mergekit's fixed cost (Python, torch, transformers imports): matters for small models
        r = measured_run([args.mergekit_python, "-m", "mergekit.scripts.run_yaml", "--help"],
                         os.path.join(work, "mergekit-help.log"), 300)
        meta["mergekit_startup_s"] = r["wall_s"]
        meta["mergekit_startup_rss_kib"] = r["maxrss_kib"]
    sizes = [gen.parse_count(x) for x in args.sizes.split(",")] if args.sizes else [args.target_params]
    results = []
    roots = []
    for size in sizes:
        preset, shape = shape_for(args, size)
        root, paths = ensure_inputs(work, preset, shape, args, log)
        roots.append(root)
        input_bytes = folder_bytes(paths["base"])
        model = {"preset": preset, "shape": shape, "params": gen.param_count(shape),
                 "bytes_per_model": input_bytes, "root": root}
        cfgs = configs(paths)
        for name in names:
            cfg = cfgs[name]
            cfg_path = os.path.join(root, f"{name}.yml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
            used = sorted({m["model"] for m in cfg["models"]} | ({cfg["base_model"]} if "base_model" in cfg else set()))
            entry = {"config": name, "note": CONFIG_NOTES[name], "model": model, "inputs_used": len(used),
                     "input_bytes": sum(folder_bytes(u) for u in used), "medley": [], "mergekit": []}
            log(f"[{gen.param_count(shape) / 1e9:.2f}B] {name}")
            for rep in range(args.repeat):
                if not args.skip_medley:
                    entry["medley"].append(run_tool("medley", cfg_path, os.path.join(root, f"out-{name}"),
                                                    used, args, log))
                if not args.skip_mergekit:
                    entry["mergekit"].append(run_tool("mergekit", cfg_path, os.path.join(root, f"out-{name}"),
                                                      used, args, log))
            results.append(entry)
            write_record(args, meta, results)
    if args.clean_inputs:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
    print(write_record(args, meta, results))


def write_record(args, meta, results):
    path = args.record
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    m = meta["machine"]
    L = ["# medley merge vs mergekit: speed and memory\n",
         f"Generated by `merge/tools/bench_merge.py` on {meta['date']}.\n",
         f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM, {m['os']}",
         f"- disk: {m['disk']}",
         f"- mergekit {meta['mergekit']} (torch {meta['torch']}, {meta.get('torch_threads')} torch threads, "
         f"transformers {meta['transformers']}, Python {m['python']})"]
    if meta.get("medley"):
        L.append(f"- medley: `{meta['medley']}` (built {meta['medley_mtime']}, `--version`: "
                 f"{meta.get('medley_version') or 'n/a'}), threads: {meta['threads'] or 'default'}, "
                 f"repository at {meta.get('git')}")
    L.append(f"- runs: {meta['repeat']} per tool and config (median shown), warm page cache (inputs read with "
             f"`cat > /dev/null` before each run), outputs deleted after each run; mergekit: "
             f"`python -m mergekit.scripts.run_yaml CONFIG OUT --no-copy-tokenizer --no-write-model-card` "
             f"on CPU, default threads, killed after {meta['mergekit_timeout']:.0f} s")
    if meta.get("mergekit_startup_s") is not None:
        L.append(f"- mergekit's fixed startup cost (`run_yaml --help`: imports of torch, transformers, mergekit): "
                 f"{meta['mergekit_startup_s']:.1f} s wall, {fmt_rss(meta['mergekit_startup_rss_kib'])} RSS; "
                 f"included in its times below")
    L.append(f"- dtype: {meta['dtype']} inputs, no `dtype`/`out_dtype` in the configs (each tool's default)")
    L.append("- wall: elapsed time; CPU: user + sys of the process; RSS: peak resident set of the command (GNU time's %M)\n")

    by_model = {}
    for e in results:
        by_model.setdefault(json.dumps(e["model"], sort_keys=True), []).append(e)
    for key, entries in by_model.items():
        model = entries[0]["model"]
        s = model["shape"]
        ram = m.get("ram_bytes")
        fits = ""
        if ram:
            big = max(e["input_bytes"] for e in entries)
            fits = (f"; the largest config reads {human_bytes(big)}, "
                    + ("which fits in RAM (warm cache holds)" if big < 0.6 * ram
                       else "which does NOT fit comfortably in RAM: runs read partly from disk"))
        L.append(f"## {model['params']:,} parameters ({model['preset']} shape)\n")
        L.append(f"hidden {s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, heads "
                 f"{s['heads']}/{s['kv_heads']}, vocab {s['vocab']}, untied lm_head; "
                 f"{human_bytes(model['bytes_per_model'])} per model in {meta['dtype']}{fits}.\n")
        L.append("| config | medley wall (s) | medley CPU (s) | medley peak RSS | mergekit wall (s) | "
                 "mergekit CPU (s) | mergekit peak RSS | wall ratio (mergekit/medley) | "
                 "CPU ratio (mergekit/medley) |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        notes = []
        for e in entries:
            md, mk = summarize(e["medley"]), summarize(e["mergekit"])
            md_bad = cell_status(e["medley"], args.medley_timeout)
            mk_bad = cell_status(e["mergekit"], args.mergekit_timeout)
            cells = [f"{e['config']} ({e['note']})"]
            if md:
                cells += [fmt_s(md["wall_s"]), fmt_s(md["cpu_s"]), fmt_rss(md["maxrss_kib"])]
            else:
                cells += [md_bad or "not run", "-", "-"]
            if mk:
                cells += [fmt_s(mk["wall_s"]), fmt_s(mk["cpu_s"]), fmt_rss(mk["maxrss_kib"])]
            elif mk_bad and e["mergekit"]:
                r = e["mergekit"][0]
                cells += [mk_bad, f"{r['cpu_s']:.1f} (until killed)" if r["killed"] else "-",
                          f"{fmt_rss(r['maxrss_kib'])} (until killed)" if r["killed"] else "-"]
            else:
                cells += ["not run", "-", "-"]
            if md and mk:
                cells += [f"{mk['wall_s'] / md['wall_s']:.1f}x", f"{mk['cpu_s'] / md['cpu_s']:.1f}x"]
            elif md and mk_bad and e["mergekit"] and e["mergekit"][0]["killed"]:
                r = e["mergekit"][0]
                cells += [f"> {r['wall_s'] / md['wall_s']:.1f}x", f"> {r['cpu_s'] / md['cpu_s']:.1f}x"]
            else:
                cells += ["-", "-"]
            L.append("| " + " | ".join(cells) + " |")
            for tool in ("medley", "mergekit"):
                for r in e[tool]:
                    if r["rc"] != 0 and not r["killed"]:
                        notes.append(f"{tool} {e['config']} failed (rc {r['rc']}):\n```\n{r['output_tail']}\n```")
            outs = {tool: e[tool][0].get("out_tensors") for tool in ("medley", "mergekit") if e[tool]}
            if len({v for v in outs.values() if v is not None}) > 1:
                notes.append(f"{e['config']}: output tensor counts differ: {outs}")
        L.append("")
        if args.repeat > 1:
            L.append("All runs (wall s / CPU s / RSS):\n")
            for e in entries:
                for tool in ("medley", "mergekit"):
                    if e[tool]:
                        L.append(f"- {e['config']} {tool}: " + ", ".join(
                            f"{r['wall_s']:.1f} / {r['cpu_s']:.1f} / {fmt_rss(r['maxrss_kib'])}" for r in e[tool]))
            L.append("")
        L.extend(notes)
        if notes:
            L.append("")
    if len(by_model) > 1:
        L.append("## medley peak RSS by model size\n")
        L.append("| config | " + " | ".join(f"{json.loads(k)['params'] / 1e9:.2f}B" for k in by_model) + " |")
        L.append("|---|" + "---|" * len(by_model))
        for name in dict.fromkeys(e["config"] for e in results):
            row = [name]
            for entries in by_model.values():
                e = next((x for x in entries if x["config"] == name), None)
                md = summarize(e["medley"]) if e else None
                row.append(f"{fmt_rss(md['maxrss_kib'])} ({fmt_s(md['wall_s'])} s)" if md else "-")
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    L.append(f"Raw numbers: `{os.path.basename(os.path.splitext(path)[0])}.json`.")
    text = "\n".join(L) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    main()
