#!/usr/bin/env python3
"""Generate Llama-shaped synthetic checkpoint folders (for medley / mergekit tests).

A folder holds what transformers' and mergekit's loaders expect:

    config.json                      LlamaForCausalLM, model_type llama, torch_dtype ...
    model.safetensors                (one file when it fits in --shard-size)
    model-0000i-of-0000N.safetensors + model.safetensors.index.json  (otherwise)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (tiny, WordLevel)

Tensor names are the standard Hugging Face Llama names (model.embed_tokens.weight,
model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, model.layers.{i}.mlp.{gate,up,down}_proj.weight,
model.layers.{i}.{input,post_attention}_layernorm.weight, model.norm.weight, lm_head.weight),
every file carries __metadata__ {"format": "pt"}.

Generation streams: the shard layout is planned from the shapes alone, then each shard's
tensors are generated (or, for --like, read from the base one at a time), written, and freed,
so at most one shard (plus one f32 tensor) is in memory at a time.

Values: linear weights ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.02); each tensor has its own
generator seeded from (--seed, tensor name), so a tensor does not depend on the shard layout.
A fine-tune (--like BASE --noise STD) is base + N(0, STD) computed in f32 and rounded to the
output dtype; its noise seed defaults to a hash of the output path, so two fine-tunes written
to different folders differ even without --seed.

Usage:
    python gen_checkpoints.py --out DIR [--preset tiny|mini|small|tinyllama|llama3b|llama8b]
        [--target-params 0.5e9 | --params 3.6B] [--hidden H] [--intermediate I] [--layers L] [--heads N]
        [--kv-heads K] [--vocab V] [--dtype bf16|f16|f32] [--shard-size 5GB] [--seed S]
        [--overwrite]
    python gen_checkpoints.py --out DIR --like BASE_DIR --noise 0.01 [--seed S] [--dtype ...]
        [--shard-size ...]

Examples:
    # tiny odd-sized model (~0.3 MB in bf16) and two fine-tunes of it
    python gen_checkpoints.py --out /tmp/m/base --preset tiny
    python gen_checkpoints.py --out /tmp/m/ft1 --like /tmp/m/base --noise 0.01 --seed 1
    python gen_checkpoints.py --out /tmp/m/ft2 --like /tmp/m/base --noise 0.01 --seed 2
    # Llama-3.2-3B shape (3.607e9 parameters, untied lm_head), 2 GB shards
    python gen_checkpoints.py --out /work/big/base --preset llama3b --shard-size 2GB
    # about 1e9 parameters: picks a preset by size and scales its layer count
    python gen_checkpoints.py --out /work/b/base --target-params 1e9

--target-params without --preset picks, among mini (50M), small (201M), tinyllama (1.10B),
llama3b (3.61B) and llama8b (8.03B), the preset whose own size is nearest the target
(by ratio; its embeddings plus 2 layers must fit), then sets the layer count (at least 1)
to get as close to the target as possible. With --preset it scales that
preset's layer count. --hidden/--layers/... override single fields afterwards.
"""

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import zlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Shapes. llama3b is Llama-3.2-3B's (with an untied lm_head: 3,606,752,256 parameters);
# llama8b is Llama-3.1-8B's; tinyllama is TinyLlama-1.1B's.
PRESETS = {
    "tiny": dict(hidden=64, intermediate=176, layers=3, heads=4, kv_heads=2, vocab=257),
    "mini": dict(hidden=512, intermediate=1408, layers=6, heads=8, kv_heads=4, vocab=32000),
    "small": dict(hidden=1024, intermediate=2816, layers=12, heads=16, kv_heads=4, vocab=32000),
    "tinyllama": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "llama3b": dict(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=128256),
    "llama8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
}
SIZE_LADDER = ["mini", "small", "tinyllama", "llama3b", "llama8b"]

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "f16": torch.float16, "float16": torch.float16, "fp16": torch.float16,
    "f32": torch.float32, "float32": torch.float32, "fp32": torch.float32,
}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def parse_size(text):
    """'5GB' -> 5e9, '2GiB' -> 2*2**30, '500MB', '123' (bytes)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 5GB, 500MB, 2GiB, 1000000)")
    num = float(m.group(1))
    unit = (m.group(2) or "").upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(num * mult)


def parse_count(text):
    """'3.6B' -> 3.6e9, '500M', '50k', '1e9' -> a float parameter count."""
    t = str(text).strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], None)
    try:
        return float(t[:-1]) * mult if mult else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad parameter count {text!r} (use e.g. 3.6B, 500M, 1e9)")


def layer_params(s):
    h, i = s["hidden"], s["intermediate"]
    hd = h // s["heads"]
    kv = s["kv_heads"] * hd
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def fixed_params(s):
    return 2 * s["vocab"] * s["hidden"] + s["hidden"]  # embed + lm_head + final norm


def param_count(s):
    return fixed_params(s) + s["layers"] * layer_params(s)


def shape_for_target(target, preset=None):
    if preset is None:
        # the preset whose own size is nearest the target (by ratio), among those whose
        # embeddings plus 2 layers fit in it
        fits = [n for n in SIZE_LADDER
                if fixed_params(PRESETS[n]) + 2 * layer_params(PRESETS[n]) <= target] or SIZE_LADDER[:1]
        preset = min(fits, key=lambda n: abs(math.log(param_count(PRESETS[n]) / target)))
    s = dict(PRESETS[preset])
    s["layers"] = max(1, round((target - fixed_params(s)) / layer_params(s)))
    return preset, s


def tensor_plan(s):
    """[(name, shape)] in Hugging Face state-dict order."""
    h, i, v = s["hidden"], s["intermediate"], s["vocab"]
    hd = h // s["heads"]
    kv = s["kv_heads"] * hd
    plan = [("model.embed_tokens.weight", (v, h))]
    for l in range(s["layers"]):
        p = f"model.layers.{l}."
        plan += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    plan += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return plan


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def split_shards(plan, elem_size, limit):
    """Greedy: start a new shard when the next tensor would push a non-empty shard past limit."""
    shards, cur, cur_bytes = [], [], 0
    for name, shape in plan:
        nbytes = numel(shape) * elem_size
        if cur and cur_bytes + nbytes > limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def generator(seed, name):
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def fresh_tensor(name, shape, seed, dtype):
    g = generator(seed, name)
    t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02)
    if len(shape) == 1:
        t.add_(1.0)
    return t.to(dtype)


def write_config(out, s, dtype):
    h = s["hidden"]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": h // s["heads"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "torch_dtype": DTYPE_NAMES[dtype],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "transformers_version": "4.44.0",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def write_tokenizer(out, vocab):
    """A tiny but valid `tokenizers` WordLevel tokenizer (specials + lowercase letters)."""
    words = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = words[: max(3, min(len(words), vocab))]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": k, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for k, w in enumerate(words[:3])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: k for k, w in enumerate(words)}, "unk_token": "<unk>"},
    }
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tok, f, indent=2)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    tcfg = dict(specials, tokenizer_class="PreTrainedTokenizerFast", model_max_length=2048,
                clean_up_tokenization_spaces=False)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)


def shard_names(n):
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def write_shards(out, shards, dtype, make_tensor, quiet=False):
    """make_tensor(name, shape) -> tensor of dtype. Writes shards one at a time."""
    names = shard_names(len(shards))
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        tensors = {}
        for name, shape in shard:
            t = make_tensor(name, shape).contiguous()
            assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
            assert t.dtype == dtype, (name, t.dtype, dtype)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
        if not quiet:
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            print(f"  wrote {fname}: {len(tensors)} tensors, {nbytes / 1e6:.1f} MB", flush=True)
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    return total


def read_folder_layout(folder):
    """{name: (file, shape, st_dtype)} for a safetensors checkpoint folder, in file order."""
    idx = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = list(dict.fromkeys(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    layout = {}
    for fname in files:
        path = os.path.join(folder, fname)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            layout[name] = (path, tuple(info["shape"]), info["dtype"])
    return layout


def prepare_out(out, overwrite):
    if os.path.exists(out):
        if not overwrite and os.listdir(out):
            sys.exit(f"error: {out} exists and is not empty (use --overwrite)")
        shutil.rmtree(out)
    os.makedirs(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default tiny)")
    ap.add_argument("--target-params", "--params", type=parse_count,
                    help="total parameter count to aim for, e.g. 0.5e9, 500M, 3.6B (scales the layer count)")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--dtype", choices=sorted(DTYPES),
                    help="bf16 (default), f16 or f32; with --like: default is the base's dtype")
    ap.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"),
                    help="largest shard in bytes (5GB = 5e9, 2GiB = 2^31; default 5GB)")
    ap.add_argument("--seed", type=int, help="random seed (default 0; with --like: hash of --out)")
    ap.add_argument("--like", metavar="BASE_DIR", help="make a fine-tune of this checkpoint")
    ap.add_argument("--noise", type=float, default=0.01, help="std of the noise for --like (0.01)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    out = os.path.abspath(args.out)

    if args.like:
        base = os.path.abspath(args.like)
        with open(os.path.join(base, "config.json")) as f:
            cfg = json.load(f)
        layout = read_folder_layout(base)
        base_dtypes = {ST_DTYPES[d] for _, _, d in layout.values()}
        if args.dtype:
            dtype = DTYPES[args.dtype]
        elif len(base_dtypes) == 1:
            dtype = base_dtypes.pop()
        else:
            dtype = torch.bfloat16
        seed = args.seed if args.seed is not None else zlib.crc32(out.encode())
        elem = torch.tensor([], dtype=dtype).element_size()
        plan = [(name, shape) for name, (_, shape, _) in layout.items()]
        shards = split_shards(plan, elem, args.shard_size)
        if os.path.realpath(base) == os.path.realpath(out):
            sys.exit("error: --out must differ from --like")
        prepare_out(out, args.overwrite)
        handles = {}

        def make(name, shape):
            path = layout[name][0]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt")
            t = handles[path].get_tensor(name).to(torch.float32)
            t.add_(torch.randn(shape, generator=generator(seed, name), dtype=torch.float32),
                   alpha=args.noise)
            return t.to(dtype)

        n = sum(numel(s) for _, s in plan)
        if not args.quiet:
            print(f"{out}: fine-tune of {base}, noise std {args.noise}, seed {seed}, "
                  f"{n:,} parameters, {DTYPE_NAMES[dtype]}, {len(shards)} shard(s)", flush=True)
        write_shards(out, shards, dtype, make, args.quiet)
        handles.clear()
        cfg = copy.deepcopy(cfg)
        cfg["torch_dtype"] = DTYPE_NAMES[dtype]
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.exists(os.path.join(base, extra)):
                shutil.copy(os.path.join(base, extra), os.path.join(out, extra))
        if not args.quiet:
            print(f"done: {out}")
        return

    if args.target_params:
        preset, s = shape_for_target(args.target_params, args.preset)
    else:
        preset = args.preset or "tiny"
        s = dict(PRESETS[preset])
    for key in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if s["hidden"] % s["heads"] or s["heads"] % s["kv_heads"]:
        sys.exit(f"error: hidden ({s['hidden']}) must be a multiple of heads ({s['heads']}) "
                 f"and heads a multiple of kv-heads ({s['kv_heads']})")
    dtype = DTYPES[args.dtype or "bf16"]
    seed = args.seed if args.seed is not None else 0
    elem = torch.tensor([], dtype=dtype).element_size()
    plan = tensor_plan(s)
    shards = split_shards(plan, elem, args.shard_size)
    prepare_out(out, args.overwrite)
    if not args.quiet:
        print(f"{out}: preset {preset} {s}, {param_count(s):,} parameters, "
              f"{DTYPE_NAMES[dtype]}, seed {seed}, {len(shards)} shard(s)", flush=True)
    write_config(out, s, dtype)
    write_tokenizer(out, s["vocab"])
    write_shards(out, shards, dtype, lambda name, shape: fresh_tensor(name, shape, seed, dtype),
                 args.quiet)
    if not args.quiet:
        print(f"done: {out}")


if __name__ == "__main__":
    main()
