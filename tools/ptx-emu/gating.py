#!/usr/bin/env python3
"""Runs medley's top-k gating PTX (ptx/gating_v2.ptx: gate_topk_v3 by
default, gate_topk_v2 with MEDLEY_EMU_KERNEL=gate_topk_v2) in a small warp
emulator on the CPU and compares its ids and weights bit for bit with the
core (medley_moe_topk_softmax / medley_moe_keep_topk_softmax of the C ABI's
cdylib, so the reference is the Rust core itself).

The emulator: per-lane registers and predicates, divergent branches,
`redux.sync` / `shfl.sync` / `vote.sync` executed when all 32 lanes reach
them, bounds-checked global and shared memory, float arithmetic in numpy
float32 (round to nearest, subnormals kept), PTX `max.f32`'s NaN rule. A
register read before any write is an error for v3 (strict) and a counted
poison value for v2 (which reads some on lanes whose values it never
uses). gate_topk_v2 has passed the GPU conformance suite, so its passing
here (0 of 1247 rows differ over seeds 0x7E53 and 99, modes 0-2, f32 / f16
/ bf16, E 1-512, the scalar and vector load paths) is evidence for the
emulator itself.

Not a substitute for the GPU conformance test (cuda/tests/moe.rs): it
checks the kernel's logic as written, not what ptxas makes of it or the
hardware.

Usage: cargo build -p medley-ffi && python3 tools/ptx-emu/gating.py [ROWS]
(ROWS: about how many token rows to emulate over all cases, default 1500;
about 15 ms a row for v3, 60 for v2). Needs numpy. Exit 1 on any
difference. MEDLEY_EMU_SEED picks the cases (default 0x7E53, what CI
runs). MEDLEY_EMU_COUNT=E,k counts the PTX instructions a warp issues per
token, v2 beside v3; MEDLEY_EMU_COUNT=deepseek counts gate_grouped_v2's and
gate_grouped_v3's at the DeepSeek-V3 configuration. MEDLEY_EMU_KERNEL=gate_grouped_v2 checks
grouped routing against medley_moe_grouped_topk (random configurations);
MEDLEY_EMU_KERNEL=gate_grouped_v3 the same over the configurations its
launcher gives it, with non-finite biases too. MEDLEY_EMU_PTX points it
at another PTX file: five deliberate mutations of gate_topk_v3 (the +1
that joins -0 and +0, the tie order, one sort comparator, the
NaN-below--inf check, the +inf rows) each fail it, and five of
gate_grouped_v3 (group tie order, the lane sort's index tie-break, the
butterfly over a group's lanes, the top-2 merge, the scaling factor).
"""
import ctypes
import os
import re
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
M32 = 0xFFFFFFFF


# ------------------------------------------------------------------ parsing
def load_entry(name):
    text = open(os.environ.get("MEDLEY_EMU_PTX", os.path.join(ROOT, "ptx/gating_v2.ptx"))).read()
    start = text.index(f".visible .entry {name}(")
    body = text[text.index("{", start) + 1 :]
    depth, end = 1, 0
    for i, ch in enumerate(body):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            end = i
            break
    lines = [ln.split("//")[0].strip() for ln in body[:end].splitlines()]
    prog, labels = [], {}
    for ln in lines:
        if not ln or ln.startswith(".reg"):
            continue
        if ln.endswith(":"):
            labels[ln[:-1]] = len(prog)
            continue
        assert ln.endswith(";"), ln
        ln = ln[:-1]
        pred = None
        if ln.startswith("@"):
            p, ln = ln.split(None, 1)
            pred = (p[1:].lstrip("!"), p.startswith("@!"))
        op, _, rest = ln.partition(" ")
        args = split_args(rest.strip())
        prog.append((pred, op, args))
    return prog, labels


def split_args(s):
    out, cur, depth = [], "", 0
    for ch in s:
        if ch in "{[":
            depth += 1
        if ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


# ------------------------------------------------------------------ values
def f2b(x):
    return struct.unpack("<I", struct.pack("<f", np.float32(x)))[0]


def b2f(b):
    return np.frombuffer(struct.pack("<I", b & M32), dtype=np.float32)[0]


def s32(v):
    v &= M32
    return v - (1 << 32) if v >> 31 else v


class Lane:
    def __init__(self, sregs):
        self.r = dict(sregs)
        self.pc = 0
        self.done = False

    def val(self, a):
        if a.startswith("%"):
            if a not in self.r:
                # A register read before any write: an error in strict mode
                # (v3); otherwise a poison value, counted (v2 reads %myk so
                # on lanes >= k, whose values it never uses).
                if STRICT:
                    raise KeyError(f"{a} read before it is written (pc {self.pc})")
                UNINIT.add(a)
                return 0x7FA5A5A5
            return self.r[a]
        if a.startswith("0f"):
            return int(a[2:], 16)
        if a.startswith("0x") or a.startswith("-0x"):
            return int(a, 16) & M32
        return int(a) & M32


SYNC = ("redux.sync", "shfl.sync", "vote.sync")
STRICT = True
UNINIT = set()
# Address of the dynamic shared memory symbol (a segment of Mem).
SMEM = 0x4000_0000
SYMBOLS = {"gsm": SMEM}


def step(lane, ins, mem, params, labels):
    """Executes one non-collective instruction; returns False at a
    collective (not executed) so the warp can run it for every lane."""
    pred, op, a = ins
    if pred is not None:
        v = lane.r[pred[0]]
        if v == pred[1]:  # predicate false (or !true)
            lane.pc += 1
            return True
    if op.startswith(SYNC):
        return False
    lane.pc += 1
    R = lane.r
    base = op.split(".")[0]
    ty = op.split(".")[-1]
    if base == "bra":
        lane.pc = labels[a[0]]
    elif base == "ret":
        lane.done = True
    elif op == "ld.param.u32":
        off = int(re.match(r"\[p\+(\d+)\]", a[1]).group(1))
        R[a[0]] = struct.unpack_from("<I", params, off)[0]
    elif op == "ld.param.f32":
        off = int(re.match(r"\[p\+(\d+)\]", a[1]).group(1))
        R[a[0]] = struct.unpack_from("<I", params, off)[0]
    elif op == "ld.param.u64":
        off = int(re.match(r"\[p\+(\d+)\]", a[1]).group(1))
        R[a[0]] = struct.unpack_from("<Q", params, off)[0]
    elif op == "cvta.to.global.u64":
        R[a[0]] = R[a[1]]
    elif op.startswith("ld.global") and ".v4." in op:
        regs = [x.strip() for x in a[0].strip("{}").split(",")]
        ad = a[1].strip("[]").split("+")
        addr = R[ad[0]] + (int(ad[1]) if len(ad) > 1 else 0)
        for i, rg in enumerate(regs):
            R[rg] = mem.load32(addr + 4 * i)
    elif op.startswith("st.global"):
        mem.store32(R[a[0].strip("[]")], lane.val(a[1]))
    elif op == "mov.b32" and a[0].startswith("{"):
        lo, hi = [x.strip() for x in a[0].strip("{}").split(",")]
        v = lane.val(a[1])
        R[lo], R[hi] = v & 0xFFFF, v >> 16
    elif base == "mov":
        R[a[0]] = SYMBOLS[a[1]] if a[1] in SYMBOLS else lane.val(a[1])
    elif op == "bar.warp.sync":
        pass
    elif op.startswith("ld.shared") or op.startswith("ld.global") and not a[0].startswith("{"):
        addr = lane.val(a[1].strip("[]").split("+")[0]) + (int(a[1].strip("[]").split("+")[1]) if "+" in a[1] else 0)
        size = 2 if op.endswith("16") else 4
        R[a[0]] = mem.load(addr, size)
    elif op.startswith("st.shared"):
        mem.store32(lane.val(a[0].strip("[]")), lane.val(a[1]))
    elif base == "selp":
        R[a[0]] = lane.val(a[1]) if R[a[3]] else lane.val(a[2])
    elif op in ("setp.eq.and.u32", "setp.le.and.u32", "setp.ne.and.u32", "setp.gt.and.u32", "setp.gt.or.u32",
                "setp.gt.or.f32"):
        x, y = lane.val(a[1]), lane.val(a[2])
        if op.endswith("f32"):
            x, y = b2f(x), b2f(y)
        c = {"eq": x == y, "le": x <= y, "ne": x != y, "gt": x > y}[op.split(".")[1]]
        p = R[a[3].lstrip("!")]
        p = not p if a[3].startswith("!") else p
        R[a[0]] = (c and p) if op.split(".")[2] == "and" else (c or p)
    elif op == "setp.ne.u64":
        R[a[0]] = lane.val(a[1]) != lane.val(a[2])
    elif op == "div.u32":
        R[a[0]] = lane.val(a[1]) // lane.val(a[2])
    elif op in ("abs.f32", "neg.f32"):
        v = lane.val(a[1])
        R[a[0]] = (v & 0x7FFFFFFF) if base == "abs" else (v ^ 0x80000000)
    elif base == "setp":
        cmp_, t = op.split(".")[1], op.split(".")[-1]
        x, y = lane.val(a[1]), lane.val(a[2])
        if t == "f32":
            fx, fy = b2f(x), b2f(y)
            res = {
                "lt": fx < fy, "le": fx <= fy, "gt": fx > fy, "ge": fx >= fy,
                "eq": fx == fy, "ne": fx != fy, "nan": bool(np.isnan(fx) or np.isnan(fy)),
                "neu": not (fx == fy), "equ": bool(fx == fy or np.isnan(fx) or np.isnan(fy)),
            }[cmp_]
        else:
            if t == "s32":
                x, y = s32(x), s32(y)
            res = {"lt": x < y, "le": x <= y, "gt": x > y, "ge": x >= y, "eq": x == y, "ne": x != y}[cmp_]
        R[a[0]] = bool(res)
    elif op in ("and.pred", "or.pred"):
        pv = lambda n: (not R[n[1:]]) if n.startswith("!") else R[n]
        x, y = pv(a[1]), pv(a[2])
        R[a[0]] = (x and y) if base == "and" else (x or y)
    elif ty in ("u32", "s32", "b32") and base in ("add", "sub", "and", "or", "xor", "shl", "shr", "max", "min", "not", "mul", "mad"):
        x = lane.val(a[1])
        y = lane.val(a[2]) if len(a) > 2 else 0
        if base == "add":
            v = x + y
        elif base == "sub":
            v = x - y
        elif base == "and":
            v = x & y
        elif base == "or":
            v = x | y
        elif base == "xor":
            v = x ^ y
        elif base == "not":
            v = ~x
        elif base == "shl":
            v = x << y if y < 32 else 0
        elif base == "shr":
            v = (s32(x) >> min(y, 31)) if ty == "s32" else (x >> y if y < 32 else 0)
        elif base == "max":
            v = max(s32(x), s32(y)) if ty == "s32" else max(x, y)
        elif base == "min":
            v = min(s32(x), s32(y)) if ty == "s32" else min(x, y)
        elif op == "mul.wide.u32":
            R[a[0]] = x * y
            return True
        elif op == "mad.lo.u32":
            v = x * y + lane.val(a[3])
        elif op == "mul.lo.u32":
            v = x * y
        else:
            raise NotImplementedError(op)
        R[a[0]] = v & M32
    elif op in ("add.u64", "shl.b64"):
        x, y = lane.val(a[1]), lane.val(a[2])
        R[a[0]] = ((x + y) if base == "add" else (x << y)) & 0xFFFFFFFFFFFFFFFF
    elif ty == "f32" and base in ("add", "sub", "mul", "div"):
        x, y = b2f(lane.val(a[1])), b2f(lane.val(a[2]))
        with np.errstate(all="ignore"):
            v = {"add": x + y, "sub": x - y, "mul": x * y, "div": x / y}[base]
        assert op.split(".")[1] == "rn", op
        R[a[0]] = f2b(np.float32(v))
    elif op in ("max.f32", "min.f32"):
        xb, yb = lane.val(a[1]), lane.val(a[2])
        x, y = b2f(xb), b2f(yb)
        # PTX max/min.f32: a NaN input yields the other input; NaN only when both are
        if np.isnan(x) and np.isnan(y):
            R[a[0]] = 0x7FFFFFFF
        elif np.isnan(x) or np.isnan(y):
            R[a[0]] = yb if np.isnan(x) else xb
        else:
            R[a[0]] = f2b(max(x, y) if base == "max" else min(x, y))
    elif op == "cvt.u32.u16":
        R[a[0]] = lane.val(a[1]) & 0xFFFF
    elif op == "cvt.u64.u32":
        R[a[0]] = lane.val(a[1]) & M32
    elif op == "cvt.u16.u32":
        R[a[0]] = lane.val(a[1]) & 0xFFFF
    elif op == "cvt.f32.f16":
        h = np.frombuffer(struct.pack("<H", lane.val(a[1]) & 0xFFFF), dtype=np.float16)[0]
        R[a[0]] = f2b(np.float32(h))
    elif op == "cvt.rn.f32.u32":
        R[a[0]] = f2b(np.float32(lane.val(a[1])))
    else:
        raise NotImplementedError(op)
    return True


def collective(lanes, ins):
    pred, op, a = ins
    assert pred is None, ins
    if op.startswith("redux.sync"):
        kind = op.split(".")[2]
        vals = [ln.val(a[1]) for ln in lanes]
        v = {"max": max, "min": min, "add": lambda x: sum(x) & M32}[kind](vals)
        for ln in lanes:
            ln.r[a[0]] = v
    elif op == "shfl.sync.idx.b32":
        src = [ln.val(a[1]) for ln in lanes]
        for ln in lanes:
            ln.r[a[0]] = src[ln.val(a[2]) & 31]
    elif op == "shfl.sync.bfly.b32":
        src = [ln.val(a[1]) for ln in lanes]
        for i, ln in enumerate(lanes):
            ln.r[a[0]] = src[i ^ (ln.val(a[2]) & 31)]
    elif op == "vote.sync.any.pred":
        v = any(ln.r[a[1]] for ln in lanes)
        for ln in lanes:
            ln.r[a[0]] = v
    else:
        raise NotImplementedError(op)
    for ln in lanes:
        ln.pc += 1


class Mem:
    def __init__(self):
        self.seg = {}

    def add(self, base, data):
        self.seg[base] = bytearray(data)

    def _find(self, addr):
        for b, d in self.seg.items():
            if b <= addr < b + len(d):
                return d, addr - b
        raise IndexError(f"address {addr:#x} outside every buffer")

    def load32(self, addr):
        return self.load(addr, 4)

    def load(self, addr, size):
        d, o = self._find(addr)
        assert o + size <= len(d), f"load past the end at {addr:#x}"
        return struct.unpack_from("<I" if size == 4 else "<H", d, o)[0]

    def store32(self, addr, v):
        d, o = self._find(addr)
        assert o + 4 <= len(d), f"store past the end at {addr:#x}"
        struct.pack_into("<I", d, o, v & M32)


def first_difference(mem, I, W, ids_c, w_c):
    """The emulated ids and weight bits (segments I and W of mem) and the
    first slot where they differ from the core's (every NaN weight equal),
    or None."""
    ids_g = np.frombuffer(bytes(mem.seg[I]), dtype=np.uint32)
    w_g = np.frombuffer(bytes(mem.seg[W]), dtype=np.uint32)
    wb = lambda v: np.where(np.isnan(v.view(np.float32)), np.uint32(M32), v.view(np.uint32))
    diff = np.nonzero((ids_g != ids_c) | (wb(w_g) != wb(w_c.view(np.uint32))))[0]
    return ids_g, w_g, (int(diff[0]) if diff.size else None)


def run_row(prog, labels, mem, params, row):
    """Runs one warp (token row); returns the PTX instructions the warp
    issues: the union over lanes of (instruction, n-th visit), so a
    divergent path counts once for the lanes that take it, predicated-off
    instructions count, a collective counts once."""
    block, warp = divmod(row, 8)
    lanes = [Lane({"%tid.x": warp * 32 + l, "%laneid": l, "%ctaid.x": block}) for l in range(32)]
    issued = set()
    visits = [dict() for _ in lanes]

    def mark(i, pc):
        n = visits[i].get(pc, 0)
        visits[i][pc] = n + 1
        issued.add((pc, n))

    while True:
        live = [i for i, ln in enumerate(lanes) if not ln.done]
        if not live:
            return len(issued)
        for i in live:
            ln = lanes[i]
            while not ln.done:
                pc = ln.pc
                if not step(ln, prog[pc], mem, params, labels):
                    break
                mark(i, pc)
                if ln.pc >= len(prog):
                    ln.done = True
        waiting = [i for i, ln in enumerate(lanes) if not ln.done]
        if not waiting:
            return len(issued)
        assert len(waiting) == 32, "a collective with exited lanes"
        pcs = {lanes[i].pc for i in waiting}
        assert len(pcs) == 1, f"lanes at different collectives: {pcs}"
        for i in waiting:
            mark(i, lanes[i].pc)
        collective([lanes[i] for i in waiting], prog[lanes[0].pc])


# ------------------------------------------------------------------ cases
def case_rows(rng, e, t, dtype):
    grid = rng.random() < 0.4
    big = 60000.0 if dtype == 1 else 1e30
    x = np.where(grid, rng.integers(0, 7, size=(t, e)) - 3.0, rng.uniform(-8, 8, size=(t, e))).astype(np.float32)
    special = rng.integers(0, 50, size=(t, e))
    x[special == 0] = -np.inf
    x[special == 1] = -0.0
    x[special == 2] = 0.0
    x[special == 3] = big
    x[special == 4] = -big
    for r in range(t):
        kind = rng.integers(0, 30)
        if kind == 0:
            x[r] = -np.inf
        elif kind == 1:
            x[r, rng.integers(e)] = np.nan
        elif kind == 2:
            x[r, rng.integers(e)] = -np.nan
        elif kind == 3:
            x[r, rng.integers(e)] = np.inf
        elif kind == 4:
            x[r, rng.integers(e)] = np.inf
            x[r, rng.integers(e)] = np.inf
        elif kind == 5:
            x[r] = 0.0
        elif kind == 6:
            x[r] = np.where(np.arange(e) % 2 == 0, -0.0, 0.0)
        elif kind == 7:
            x[r] = np.inf
    if dtype == 0:
        return x
    if dtype == 1:
        bits = x.astype(np.float16).view(np.uint16)
        neg = np.isnan(x) & np.signbit(x)
        bits = np.where(neg, np.uint16(0xFE00), bits)
    else:
        b = x.view(np.uint32)
        rnd = ((b >> 16) & 1) + 0x7FFF
        bits = ((b + rnd) >> 16).astype(np.uint16)
        bits = np.where(np.isnan(x), np.where(np.signbit(x), 0xFFC0, 0x7FC0), bits).astype(np.uint16)
    return bits


class Rows(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("data_len", ctypes.c_size_t), ("dtype", ctypes.c_uint32),
                ("rows", ctypes.c_size_t), ("len", ctypes.c_size_t), ("stride", ctypes.c_size_t)]


def core(lib, bits, k, mode, dtype):
    t, e = bits.shape
    buf = np.ascontiguousarray(bits)
    rows = Rows(buf.ctypes.data, buf.size, dtype, t, e, 0)
    ids = np.zeros(t * k, dtype=np.uint32)
    w = np.zeros(t * k, dtype=np.float32)
    pi, pw = ids.ctypes.data, w.ctypes.data
    if mode in (0, 1):
        st = lib.medley_moe_topk_softmax(ctypes.addressof(rows), k, mode, pi, t * k, pw, t * k, None)
    else:
        st = lib.medley_moe_keep_topk_softmax(ctypes.addressof(rows), k, pi, t * k, pw, t * k, None)
    assert st == 0, st
    return ids, w


class GroupedConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("k", ctypes.c_size_t), ("scoring", ctypes.c_uint32),
                ("group_score", ctypes.c_uint32), ("n_group", ctypes.c_size_t), ("topk_group", ctypes.c_size_t),
                ("renormalize", ctypes.c_uint32), ("routed_scaling_factor", ctypes.c_float)]


def v3_groups(e, ng, tkg):
    """gate_grouped_v3 takes no group limiting, or groups of whole lanes
    (E / n_group a multiple of 8 whose eighth is a power of two)."""
    size = e // ng
    return tkg == ng or (size % 8 == 0 and (size // 8) & (size // 8 - 1) == 0)


def grouped(lib, want_rows, seed, kernel="gate_grouped_v2"):
    """MEDLEY_EMU_KERNEL=gate_grouped_v2 (or gate_grouped_v3): grouped
    (DeepSeek-V3 style) routing against medley_moe_grouped_topk, random
    configurations (v3: those its launcher gives it: sigmoid, E <= 256, E % 8 == 0, groups of whole lanes). The core refuses
    a non-finite bias, the kernels make a NaN row of every row that is not
    NaN or masked already: v3's cases include such biases, checked
    against that rule."""
    P, sz = ctypes.c_void_p, ctypes.c_size_t
    f = lib.medley_moe_grouped_topk
    f.argtypes = [P, P, P, sz, P, sz, P, sz, P]
    f.restype = ctypes.c_uint32
    global STRICT
    STRICT = False
    v3 = kernel == "gate_grouped_v3"
    STRICT = v3
    prog, labels = load_entry(kernel)
    rng = np.random.default_rng(seed)
    done, cases, bad = 0, 0, []
    deepseek = os.environ.get("MEDLEY_EMU_COUNT") == "deepseek"
    issued = 0
    while done < want_rows:
        e = int(rng.choice([8, 16, 64, 128, 160, 256] if v3 else [8, 16, 64, 128, 160, 256, 384, 512]))
        divisors = [d for d in range(1, min(e, 256) + 1) if e % d == 0]
        while True:
            ng = int(rng.choice(divisors))
            tkg = int(rng.integers(1, ng + 1))
            if not v3 or v3_groups(e, ng, tkg):
                break
        gsc = int(rng.integers(0, 2)) if e // ng >= 2 else 1
        scoring = 1 if v3 else int(rng.integers(0, 2))
        reach = tkg * (e // ng)
        k = int(rng.integers(1, min(reach, 32) + 1))
        renorm = int(rng.integers(0, 2))
        scale = float(rng.choice([1.0, 2.5]))
        dtype = int(rng.integers(0, 3))
        t = int(rng.integers(1, 20))
        x = case_rows(rng, e, t, dtype)
        bias = rng.uniform(-0.5, 0.5, size=e).astype(np.float32) if rng.random() < 0.6 else None
        if bias is not None and rng.random() < 0.3:
            # ties between selection scores and between group scores
            bias = np.round(bias * 4) / 4
        bad_bias = v3 and bias is not None and rng.random() < 0.08
        if deepseek:
            # DeepSeek-V3: E 256, 8 groups, top-4 groups, k 8, sigmoid,
            # top-2 sum, renormalized, x2.5, a bias; bf16 logits, no edge rows.
            e, ng, tkg, k, scoring, gsc, renorm, scale, dtype, t = 256, 8, 4, 8, 1, 0, 1, 2.5, 2, 64
            xf = rng.uniform(-8, 8, size=(t, e)).astype(np.float32).view(np.uint32)
            x = ((xf + ((xf >> 16) & 1) + 0x7FFF) >> 16).astype(np.uint16)
            bias = rng.uniform(-0.5, 0.5, size=e).astype(np.float32)
            bad_bias = False
        cfg = GroupedConfig(ctypes.sizeof(GroupedConfig), k, scoring, gsc, ng, tkg, renorm, scale)
        buf = np.ascontiguousarray(x)
        rows = Rows(buf.ctypes.data, buf.size, dtype, t, e, 0)
        ids_c = np.zeros(t * k, dtype=np.uint32)
        w_c = np.zeros(t * k, dtype=np.float32)
        st = f(ctypes.addressof(rows), ctypes.addressof(cfg), None if bias is None else bias.ctypes.data,
               0 if bias is None else e, ids_c.ctypes.data, t * k, w_c.ctypes.data, t * k, None)
        assert st == 0, st
        mem = Mem()
        L, I, W, B = 0x1000_0000, 0x2000_0000, 0x3000_0000, 0x5000_0000
        mem.add(L, x.tobytes())
        mem.add(I, b"\xa5" * (4 * t * k))
        mem.add(W, b"\xa5" * (4 * t * k))
        if bad_bias:
            # the kernels' rule for a non-finite bias: every row that is
            # neither NaN nor masked becomes a NaN row
            ninf = {0: -np.inf, 1: 0xFC00, 2: 0xFF80}[dtype]
            for row in range(t):
                masked = bool(np.all(x[row] == ninf))
                nanrow = bool(np.isnan(w_c[row * k]))
                if not masked and not nanrow:
                    ids_c[row * k : (row + 1) * k] = np.arange(k)
                    w_c[row * k : (row + 1) * k] = np.nan
            bias = bias.copy()
            bias[rng.integers(e)] = rng.choice([np.inf, -np.inf, np.nan])
        if bias is not None:
            mem.add(B, bias.tobytes())
        size = 4 if dtype == 0 else 2
        vec = 256 if (e * size) % 16 == 0 else 0
        params = bytearray(80)
        struct.pack_into("<QQQQ", params, 0, L, I, W, 0 if bias is None else B)
        struct.pack_into("<IIIIIIIIIIIf", params, 32, t, e, e, k, dtype | vec, 2, scoring, ng, tkg, gsc, renorm, scale)
        for row in range(-(-t // 8) * 8):
            if row % 8 == 0:
                mem.add(SMEM, b"\x5a" * (8 * (e + 256) * 4))
            n = run_row(prog, labels, mem, params, row)
            issued += n if row < t else 0
        ids_g, w_g, at = first_difference(mem, I, W, ids_c, w_c)
        if at is not None:
            bad.append(f"E={e} T={t} k={k} dtype={dtype} groups={tkg}/{ng} gsc={gsc} scoring={scoring} "
                       f"renorm={renorm} bias={bias is not None}: slot {at}: emulated ({ids_g[at]}, {w_g[at]:#x}) "
                       f"core ({ids_c[at]}, {w_c.view(np.uint32)[at]:#x})")
        done += t
        cases += 1
    print(f"{kernel} emulated (seed {seed:#x}): {cases} cases, {done} rows, {len(bad)} differ from the core")
    if deepseek:
        print(f"  DeepSeek-V3 configuration: {issued / done:.0f} PTX warp instructions per token")
    for b in bad[:10]:
        print("  " + b)
    return 1 if bad else 0


def count(lib):
    """MEDLEY_EMU_COUNT=E,k: PTX instructions a warp issues per token for
    v2 and v3 on 64 rows of bf16 logits uniform in [-8, 8) (renormalized
    top-k softmax), checked against the core as in the main run. PTX, not
    SASS: ptxas changes the absolute count (ncu measured 826 SASS warp
    instructions per token for v2 at E 256, k 8); the ratio is the point."""
    e, k = (int(x) for x in os.environ["MEDLEY_EMU_COUNT"].split(","))
    rng = np.random.default_rng(1)
    t = 64
    x = rng.uniform(-8, 8, size=(t, e)).astype(np.float32)
    b = x.view(np.uint32)
    bits = ((b + ((b >> 16) & 1) + 0x7FFF) >> 16).astype(np.uint16)
    ids_c, w_c = core(lib, bits, k, 1, 2)
    for kernel in ("gate_topk_v2", "gate_topk_v3"):
        global STRICT
        STRICT = kernel == "gate_topk_v3"
        prog, labels = load_entry(kernel)
        mem = Mem()
        L, I, W = 0x1000_0000, 0x2000_0000, 0x3000_0000
        mem.add(L, bits.tobytes())
        mem.add(I, bytes(4 * t * k))
        mem.add(W, bytes(4 * t * k))
        params = bytearray(80)
        struct.pack_into("<QQQQ", params, 0, L, I, W, 0)
        struct.pack_into("<IIIIIIIIIIIf", params, 32, t, e, e, k, 2 | 256, 1, 0, 1, 1, 1, 0, 1.0)
        n = 0
        for row in range(t):
            if row % 8 == 0:
                mem.add(SMEM, bytes(8 * (e + 256) * 4))
            n += run_row(prog, labels, mem, params, row)
        ok = first_difference(mem, I, W, ids_c, w_c)[2] is None
        print(f"{kernel}: E {e} k {k}: {n / t:.0f} PTX warp instructions per token ({'equal to' if ok else 'DIFFERS from'} the core)")
    return 0


def main():
    want_rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
    import glob

    # The C ABI's cdylib from `cargo test --workspace` (debug) or a release
    # build; MEDLEY_FFI_SO overrides.
    so = os.environ.get("MEDLEY_FFI_SO") or next(
        (p for p in (os.path.join(ROOT, f"target/{m}/libmedley_ffi.so") for m in ("release", "debug")) if os.path.exists(p)),
        None,
    )
    if so is None:
        sys.exit("no libmedley_ffi.so: run `cargo build -p medley-ffi` (or `cargo test --workspace`) first")
    try:
        lib = ctypes.CDLL(so)
    except OSError:
        # No driver here: load the stub libcuda.so.1 medley-cuda's build
        # script generated next to it (the CPU functions never call it).
        build = os.path.dirname(so)
        stubs = sorted(glob.glob(os.path.join(build, "build/medley-cuda-*/out/stub/libcuda.so.1")))
        if not stubs:
            sys.exit(f"{so} needs libcuda.so.1 and no stub was found under {build}/build")
        ctypes.CDLL(stubs[-1], mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(so)
    P, sz = ctypes.c_void_p, ctypes.c_size_t
    lib.medley_moe_topk_softmax.argtypes = [P, sz, ctypes.c_uint32, P, sz, P, sz, P]
    lib.medley_moe_keep_topk_softmax.argtypes = [P, sz, P, sz, P, sz, P]
    lib.medley_moe_topk_softmax.restype = lib.medley_moe_keep_topk_softmax.restype = ctypes.c_uint32
    if os.environ.get("MEDLEY_EMU_COUNT") == "deepseek":
        sys.exit(max(grouped(lib, 64, 1, kern) for kern in ("gate_grouped_v2", "gate_grouped_v3")))
    if os.environ.get("MEDLEY_EMU_COUNT"):
        return count(lib)
    kernel = os.environ.get("MEDLEY_EMU_KERNEL", "gate_topk_v3")
    if kernel in ("gate_grouped_v2", "gate_grouped_v3"):
        sys.exit(grouped(lib, want_rows, int(os.environ.get("MEDLEY_EMU_SEED", "0x7E53"), 0), kernel))
    v3 = kernel == "gate_topk_v3"
    assert kernel in ("gate_topk_v3", "gate_topk_v2"), kernel
    global STRICT
    STRICT = v3
    prog, labels = load_entry(kernel)
    seed = int(os.environ.get("MEDLEY_EMU_SEED", "0x7E53"), 0)
    rng = np.random.default_rng(seed)
    done, cases, bad = 0, 0, []
    while done < want_rows:
        if v3:
            e = int(rng.choice([8, 16, 32, 64, 128, 160, 256]))
            dtype = int(rng.integers(1, 3))
            mode = int(rng.integers(1, 3))  # 1 renormalized, 2 keep_topk: kernel mode 1
        else:
            e = int(rng.choice([1, 2, 3, 5, 8, 16, 60, 64, 128, 144, 160, 256, 257, 384, 511, 512]))
            dtype = int(rng.integers(0, 3))
            mode = int(rng.integers(0, 3))  # 0 softmax over E, then 1, 2 as above
        t = int(rng.integers(1, 40))
        k = int(rng.integers(1, min(e, 32) + 1))
        x = case_rows(rng, e, t, dtype)
        ids_c, w_c = core(lib, x, k, mode, dtype)
        mem = Mem()
        L, I, W = 0x1000_0000, 0x2000_0000, 0x3000_0000
        mem.add(L, x.tobytes())
        mem.add(I, b"\xa5" * (4 * t * k))
        mem.add(W, b"\xa5" * (4 * t * k))
        size = 4 if dtype == 0 else 2
        vec = 256 if (e * size) % 16 == 0 else 0  # the launcher's alignment bit (buffers are aligned)
        params = bytearray(80)
        struct.pack_into("<QQQQ", params, 0, L, I, W, 0)
        struct.pack_into("<IIIIIIIIIIIf", params, 32, t, e, e, k, dtype | vec, 0 if mode == 0 else 1, 0, 1, 1, 1, 0, 1.0)
        # Every warp of the grid (ceil(T / 8) blocks of 8): those past T
        # must return without touching memory (a store would land outside
        # every buffer and raise). v2's dynamic shared memory: 8 * (E + 256)
        # words per block, fresh (poisoned) for each block.
        for row in range(-(-t // 8) * 8):
            if row % 8 == 0 and not v3:
                mem.add(SMEM, b"\x5a" * (8 * (e + 256) * 4))
            run_row(prog, labels, mem, params, row)
        ids_g, w_g, at = first_difference(mem, I, W, ids_c, w_c)
        if at is not None:
            bad.append(f"E={e} T={t} k={k} dtype={dtype} mode={mode}: slot {at}: emulated ({ids_g[at]}, "
                       f"{w_g[at]:#x}) core ({ids_c[at]}, {w_c.view(np.uint32)[at]:#x}); row {x[at // k][:16]}")
        done += t
        cases += 1
    print(f"{kernel} emulated (seed {seed:#x}): {cases} cases, {done} rows, {len(bad)} differ from the core")
    if UNINIT:
        print(f"  registers read before written (poisoned, lenient mode): {sorted(UNINIT)}")
    for b in bad[:10]:
        print("  " + b)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
