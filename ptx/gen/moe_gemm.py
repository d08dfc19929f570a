#!/usr/bin/env python3
"""Generates the grouped expert GEMMs of the MoE layer:

- ptx/moe_mma.ptx    generation 1: mma.sync m16n8k16 + ldmatrix + multi-stage
                     cp.async with XOR-swizzled shared memory (sm_80+); the A
                     rows are gathered inside the kernel from the plan.
- ptx/moe_wgmma.ptx  generation 2: wgmma m64nNk16 with TMA loads into
                     128-byte swizzled stages, a producer warp and one or two
                     consumer warpgroups over a full/empty mbarrier ring
                     (sm_90a); A must already be in plan order.
- cuda/src/gemm_table.rs  the configuration table medley-cuda indexes (one
                     entry point per configuration, epilogue and dtype).

Usage (repo root): `python3 ptx/gen/moe_gemm.py --write`; without --write it
only checks that the checked-in files are current (exit 1 if not), as CI
does (.ci/run). Runs only under the pinned Python (PYTHON below) so that
regeneration is byte-identical.

Both generations compute, for every block of the block-padded plan
(medley_core::moe::plan::align_block_size: positions p, slot sorted[p], the
block's local expert bexp[p / plan_bm]):

    acc[p, n] = sum_k A[row(p), k] * W[e][n, k]      (f32 accumulation)

and one of two epilogues:

- swiglu (GEMM1): W = w13[e] ([2N, K]: gate rows 0..N, up rows N..2N);
  out[p, n] = silu(acc_gate) * acc_up, rounded to the input dtype.
- down (GEMM2):   W = w2[e] ([N, K]); out[p, n] = weights[slot] * acc as f32
  (the product rounded, no FMA, as the combine does), ready for the
  combine's k-way sum in j order.

Rows whose slot is the padding sentinel (slot >= n_slots) are never
stored; blocks past num_tokens_post_padded or of NO_EXPERT exit at once.
"""
import os
import sys

# The Python this generator is pinned to: the output is checked in and CI
# compares it byte for byte, so it is only ever produced by this version.
PYTHON = (3, 11)
if sys.version_info[:2] != PYTHON:
    sys.exit(
        "ptx/gen/moe_gemm.py: pinned to Python %d.%d, running under %d.%d: run it "
        "with python%d.%d, or move the pin (PYTHON here) in a commit of its own that "
        "also shows `--write` leaves its outputs unchanged" % (PYTHON + sys.version_info[:2] + PYTHON)
    )

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Generation 1 (mma.sync): (BM, BN, WM, WN, STAGES). BN counts output columns
# (the swiglu epilogue loads 2*BN weight rows). Warp tile (BM/WM) x (BN/WN).
MMA_CONFIGS = [
    (16, 32, 1, 2, 8),
    (16, 64, 1, 4, 6),
    (16, 128, 1, 4, 4),
    (32, 64, 1, 4, 6),
    (64, 64, 2, 2, 4),
    (64, 128, 2, 2, 3),
    (128, 64, 2, 2, 4),
    (128, 128, 2, 4, 3),
    (128, 128, 2, 4, 4),
    (128, 256, 2, 4, 3),
    (128, 256, 2, 4, 4),
]
# Generation 2 (wgmma): (BM, BN, STAGES); BM/64 consumer warpgroups, each
# m64 x BN (x2 for swiglu: gate and up accumulators).
WGMMA_CONFIGS = [
    (64, 128, 2),
    (64, 128, 3),
    (64, 128, 4),
    (64, 128, 6),
    (128, 64, 3),
    (128, 64, 4),
    (128, 128, 3),
    (128, 128, 4),
    (64, 256, 5),
    (128, 256, 4),
]
EPIS = ["swiglu", "down"]
DTYPES = ["bf16", "f16"]
BK = 64
SMEM_LIMIT = 227 * 1024
NEG_LOG2E = "0fBFB8AA3B"


def mma_valid(cfg, epi):
    bm, bn, wm, wn, s = cfg
    nb = bn * (2 if epi == "swiglu" else 1)
    tm, tn = bm // wm, bn // wn
    acc = (tm // 16) * (tn // 8) * 4 * (2 if epi == "swiglu" else 1)
    smem = s * (bm + nb) * 128
    return acc <= 128 and smem <= SMEM_LIMIT and tn % 16 == 0 and tm % 16 == 0


def wg_valid(cfg, epi):
    bm, bn, s = cfg
    nb = bn * (2 if epi == "swiglu" else 1)
    acc = bn // 2 * (2 if epi == "swiglu" else 1)
    smem = s * (bm + nb) * 128 + 1024 + 256
    return acc <= 128 and smem <= SMEM_LIMIT


def mma_name(cfg, epi, dt):
    bm, bn, wm, wn, s = cfg
    return f"moe_mma_{epi}_{dt}_m{bm}n{bn}w{wm}x{wn}s{s}"


def wg_name(cfg, epi, dt):
    bm, bn, s = cfg
    return f"moe_wgmma_{epi}_{dt}_m{bm}n{bn}s{s}"


class K:
    """One kernel's text and registers."""

    def __init__(self):
        self.lines = []
        self.regs = {}

    def r(self, name, ty):
        if name in self.regs:
            assert self.regs[name] == ty, (name, ty, self.regs[name])
        self.regs[name] = ty
        return "%" + name

    def emit(self, s=""):
        self.lines.append(s)

    def ins(self, op, *args, pred=None):
        p = f"@{pred} " if pred else ""
        if args:
            self.emit(f"    {p}{op:<15} " + ", ".join(args) + ";")
        else:
            self.emit(f"    {p}{op};")

    def label(self, name):
        self.emit(f"{name}:")

    def decls(self):
        by = {}
        for n, t in self.regs.items():
            by.setdefault(t, []).append("%" + n)
        out = []
        for t in sorted(by):
            names = by[t]
            for i in range(0, len(names), 12):
                out.append(f"    .reg {t:<6} " + ", ".join(names[i : i + 12]) + ";")
        return out


# Parameter block shared by both generations (offsets within the scalar
# part; generation 2 puts two 128-byte tensor maps in front of it).
PARAM_DOC = """//   off type meaning
//    0  u64  a        A rows: x [T, lda] (gather: row = slot / ktop) or rows
//                     already in plan order [len, lda] (ktop = 0)
//    8  u64  w        weights [L, NW, K] (NW = 2N for swiglu, N for down)
//   16  u64  sorted   u32 [len] slot of each plan position (>= nslots: pad)
//   24  u64  bexp     u32 [len / plan_bm] local expert of each plan block
//   32  u64  total    u32 [1] num_tokens_post_padded
//   40  u64  out      [len, ldo]: the input dtype (swiglu) or f32 (down)
//   48  u64  weights  f32 [nslots] routing weights (down only)
//   56  u32  lda      A row stride (elements, multiple of 8)
//   60  u32  ldo      out row stride (elements, even)
//   64  u32  N        output columns (multiple of 8)
//   68  u32  K        reduction length (multiple of 8)
//   72  u32  ktop     experts per token (gather), 0 = A in plan order
//   76  u32  nslots   T * k (the padding sentinel)
//   80  u32  len      plan length (multiple of plan_bm)
//   84  u32  plan_bm  the plan's block_m (a multiple of BM)
//   88  u32  group_m  M blocks per raster group (>= 1)
//   92  u32  ntiles   ceil(N / BN)
//   96  u32  nexp     L, local experts in w (a block of expert >= L exits)
//  100  u32  (padding)"""


def load_params(k, base):
    P = {}
    for name, off, ty in [
        ("a", 0, "u64"), ("w", 8, "u64"), ("sorted", 16, "u64"), ("bexp", 24, "u64"),
        ("total", 32, "u64"), ("out", 40, "u64"), ("wts", 48, "u64"), ("lda", 56, "u32"),
        ("ldo", 60, "u32"), ("N", 64, "u32"), ("K", 68, "u32"), ("ktop", 72, "u32"),
        ("nslots", 76, "u32"), ("len", 80, "u32"), ("pbm", 84, "u32"), ("gm", 88, "u32"),
        ("ntiles", 92, "u32"), ("nexp", 96, "u32"),
    ]:
        reg = k.r("p_" + name, "." + ("b64" if ty == "u64" else "b32"))
        k.ins(f"ld.param.{ty}", reg, f"[p+{base + off}]")
        P[name] = reg
    for name in ["a", "w", "sorted", "bexp", "total", "out", "wts"]:
        k.ins("cvta.to.global.u64", P[name], P[name])
    return P


def raster(k, P, bm, bn, exit_label, pid=None):
    """tile `pid` (default %ctaid.x) -> (m_base, n0, expert); branches to
    exit_label for a tile past the plan or of no local expert."""
    nm, gsz, grp, first, gs, rr, t = (k.r(n, ".b32") for n in ["nm", "gsz", "grp", "first", "gs", "rr", "rt"])
    pm, pn = k.r("pm", ".b32"), k.r("pn", ".b32")
    q = k.r("q", ".pred")
    if pid is None:
        pid = k.r("pid", ".b32")
        k.ins("mov.u32", pid, "%ctaid.x")
    k.ins("div.u32", nm, P["len"], str(bm))
    k.ins("mul.lo.u32", gsz, P["gm"], P["ntiles"])
    k.ins("div.u32", grp, pid, gsz)
    k.ins("mul.lo.u32", first, grp, P["gm"])
    k.ins("sub.u32", gs, nm, first)
    k.ins("min.u32", gs, gs, P["gm"])
    k.ins("mul.lo.u32", t, grp, gsz)
    k.ins("sub.u32", rr, pid, t)
    k.ins("rem.u32", pm, rr, gs)
    k.ins("add.u32", pm, pm, first)
    k.ins("div.u32", pn, rr, gs)
    mb, n0, e, tot = k.r("mbase", ".b32"), k.r("n0", ".b32"), k.r("e", ".b32"), k.r("tot", ".b32")
    k.ins("mul.lo.u32", mb, pm, str(bm))
    k.ins("mul.lo.u32", n0, pn, str(bn))
    k.ins("ld.global.u32", tot, f"[{P['total']}]")
    k.ins("setp.ge.u32", q, mb, tot)
    k.ins("bra.uni", exit_label, pred=q)
    k.ins("div.u32", t, mb, P["pbm"])
    a = k.r("ta", ".b64")
    k.ins("mul.wide.u32", a, t, "4")
    k.ins("add.u64", a, a, P["bexp"])
    k.ins("ld.global.u32", e, f"[{a}]")
    k.ins("setp.ge.u32", q, e, P["nexp"])
    k.ins("bra.uni", exit_label, pred=q)
    return mb, n0, e


def silu_mul(k, g, u, dst):
    t = k.r("st", ".f32")
    k.ins("mul.f32", t, g, NEG_LOG2E)
    k.ins("ex2.approx.ftz.f32", t, t)
    k.ins("add.f32", t, t, "0f3F800000")
    k.ins("div.full.f32", t, g, t)
    k.ins("mul.f32", dst, t, u)


def epilogue_row(k, P, prow, epi, skip_label):
    """Loads the slot of plan position prow; branches to skip_label for a pad
    row; returns (out row address, weight reg or None)."""
    slot, q = k.r("eslot", ".b32"), k.r("q", ".pred")
    a = k.r("ea", ".b64")
    k.ins("mul.wide.u32", a, prow, "4")
    k.ins("add.u64", a, a, P["sorted"])
    k.ins("ld.global.u32", slot, f"[{a}]")
    k.ins("setp.ge.u32", q, slot, P["nslots"])
    k.ins("bra.uni", skip_label, pred=q)
    wv = None
    if epi == "down":
        wv = k.r("ew", ".f32")
        k.ins("mul.wide.u32", a, slot, "4")
        k.ins("add.u64", a, a, P["wts"])
        k.ins("ld.global.f32", wv, f"[{a}]")
    ro = k.r("ero", ".b64")
    k.ins("mul.wide.u32", ro, prow, P["ldo"])
    k.ins("shl.b64", ro, ro, "2" if epi == "down" else "1")
    k.ins("add.u64", ro, ro, P["out"])
    return ro, wv


def store_pair(k, epi, dt, ro, col, P, v0, v1, wv, skip):
    """Stores the adjacent columns (col, col+1) of one row if col < N."""
    q = k.r("q", ".pred")
    k.ins("setp.ge.u32", q, col, P["N"])
    k.ins("bra.uni", skip, pred=q)
    a = k.r("sta", ".b64")
    if epi == "down":
        x0, x1 = k.r("sx0", ".f32"), k.r("sx1", ".f32")
        k.ins("mul.rn.f32", x0, wv, v0)
        k.ins("mul.rn.f32", x1, wv, v1)
        k.ins("mul.wide.u32", a, col, "4")
        k.ins("add.u64", a, a, ro)
        k.ins("st.global.v2.f32", f"[{a}]", "{" + f"{x0}, {x1}" + "}")
    else:
        pk = k.r("spk", ".b32")
        k.ins(f"cvt.rn.{dt}x2.f32", pk, v1, v0)
        k.ins("mul.wide.u32", a, col, "2")
        k.ins("add.u64", a, a, ro)
        k.ins("st.global.b32", f"[{a}]", pk)


# ---------------------------------------------------------------------------
# Generation 1: mma.sync
# ---------------------------------------------------------------------------
def gen_mma(cfg, epi, dt):
    bm, bn, wm, wn, S = cfg
    sw = epi == "swiglu"
    nt = 32 * wm * wn
    nb = bn * (2 if sw else 1)
    tm, tn = bm // wm, bn // wn
    MI, NI = tm // 16, tn // 8
    stage = (bm + nb) * 128
    a_ch, b_ch = bm * 8, nb * 8
    a_per, b_per = -(-a_ch // nt), -(-b_ch // nt)
    rstep = nt // 8  # rows between a thread's chunks
    assert nt % 64 == 0 and NI % 2 == 0
    name = mma_name(cfg, epi, dt)
    k = K()
    k.emit(f"// {name}: BM={bm} BN={bn} (weight rows per stage {nb}), {wm}x{wn} warps "
           f"of {tm}x{tn}, {S} stages of {stage} B")
    k.emit(f".visible .entry {name}(.param .align 8 .b8 p[104])")
    k.emit(f".maxntid {nt}, 1, 1")
    k.emit("{")
    body_start = len(k.lines)
    P = load_params(k, 0)
    tid, lane, warp = k.r("thr", ".b32"), k.r("lane", ".b32"), k.r("warp", ".b32")
    q = k.r("q", ".pred")
    k.ins("mov.u32", tid, "%tid.x")
    k.ins("and.b32", lane, tid, "31")
    k.ins("shr.u32", warp, tid, "5")
    mb, n0, e = raster(k, P, bm, bn, "EXIT")
    # shared memory
    sb = k.r("sbase", ".b32")
    k.ins("mov.u32", sb, "gsm")
    # --- per-thread copy descriptors
    t8, c, x, d0 = k.r("t8", ".b32"), k.r("cc", ".b32"), k.r("x", ".b32"), k.r("dst0", ".b32")
    k.ins("shr.u32", t8, tid, "3")
    k.ins("and.b32", c, tid, "7")
    k.ins("and.b32", x, t8, "7")
    k.ins("xor.b32", x, x, c)
    k.ins("shl.b32", x, x, "4")
    k.ins("shl.b32", d0, t8, "7")
    k.ins("add.u32", d0, d0, x)
    ccol = k.r("ccol", ".b32")
    k.ins("shl.b32", ccol, c, "3")
    # A rows (gathered)
    row, p_, slot, g = k.r("row", ".b32"), k.r("pp", ".b32"), k.r("slot", ".b32"), k.r("grow", ".b32")
    a64 = k.r("a64", ".b64")
    ktz = k.r("ktz", ".pred")
    k.ins("setp.eq.u32", ktz, P["ktop"], "0")
    apreds = []
    for i in range(a_per):
        ap, ab = k.r(f"ap{i}", ".b64"), k.r(f"ab{i}", ".b32")
        k.ins("add.u32", row, t8, str(i * rstep))
        partial = (i + 1) * nt > a_ch
        if partial:
            pr = k.r(f"apv{i}", ".pred")
            k.ins("setp.lt.u32", pr, row, str(bm))
            apreds.append(pr)
            k.ins("mov.u32", ab, "0")
            k.ins("mov.u64", ap, P["a"])
            k.ins("bra.uni", f"A_ROW_{i}", pred="!" + pr)
        else:
            apreds.append(None)
        k.ins("add.u32", p_, mb, row)
        k.ins("mul.wide.u32", a64, p_, "4")
        k.ins("add.u64", a64, a64, P["sorted"])
        k.ins("ld.global.u32", slot, f"[{a64}]")
        k.ins("setp.lt.u32", q, slot, P["nslots"])
        k.ins("selp.u32", ab, "16", "0", q)
        k.ins("div.u32", g, slot, P["ktop"], pred="!" + ktz)
        k.ins("mov.u32", g, p_, pred=ktz)
        k.ins("selp.u32", g, g, "0", q)
        k.ins("mul.wide.u32", a64, g, P["lda"])
        k.ins("shl.b64", a64, a64, "1")
        k.ins("add.u64", ap, a64, P["a"])
        if partial:
            k.label(f"A_ROW_{i}")
    # B rows (weights of expert e, clamped to valid rows)
    wexp, t64 = k.r("wexp", ".b64"), k.r("t64", ".b64")
    nw = k.r("nw", ".b32")
    k.ins("shl.b32", nw, P["N"], "1" if sw else "0")
    k.ins("mul.wide.u32", t64, nw, P["K"])
    k.ins("cvt.u64.u32", a64, e)
    k.ins("mul.lo.u64", t64, t64, a64)
    k.ins("shl.b64", t64, t64, "1")
    k.ins("add.u64", wexp, P["w"], t64)
    nm1, col = k.r("nm1", ".b32"), k.r("bcol", ".b32")
    k.ins("sub.u32", nm1, P["N"], "1")
    bpreds = []
    for i in range(b_per):
        bp = k.r(f"bp{i}", ".b64")
        k.ins("add.u32", row, t8, str(i * rstep))
        partial = (i + 1) * nt > b_ch
        if partial:
            pr = k.r(f"bpv{i}", ".pred")
            k.ins("setp.lt.u32", pr, row, str(nb))
            bpreds.append(pr)
        else:
            bpreds.append(None)
        if sw:
            hp = k.r("hp", ".pred")
            k.ins("setp.ge.u32", hp, row, str(bn))
            k.ins("sub.u32", row, row, str(bn), pred=hp)
            k.ins("add.u32", col, n0, row)
            k.ins("min.u32", col, col, nm1)
            k.ins("add.u32", col, col, P["N"], pred=hp)
        else:
            k.ins("add.u32", col, n0, row)
            k.ins("min.u32", col, col, nm1)
        k.ins("mul.wide.u32", a64, col, P["K"])
        k.ins("shl.b64", a64, a64, "1")
        k.ins("add.u64", bp, wexp, a64)
    # ldmatrix lane offsets per kk (relative to the stage base)
    alane = [k.r(f"al{kk}", ".b32") for kk in range(4)]
    blane = [k.r(f"bl{kk}", ".b32") for kk in range(4)]
    wmr, wnr, l7, t1 = k.r("wmr", ".b32"), k.r("wnr", ".b32"), k.r("l7", ".b32"), k.r("t1", ".b32")
    k.ins("rem.u32", wnr, warp, str(wn))
    k.ins("div.u32", wmr, warp, str(wn))
    k.ins("and.b32", l7, lane, "7")
    # A: row wm*tm + (lane & 15), chunk kk*2 + (lane >> 4)
    ar, br = k.r("arow", ".b32"), k.r("brow", ".b32")
    k.ins("and.b32", ar, lane, "15")
    k.ins("mad.lo.u32", ar, wmr, str(tm), ar)
    k.ins("shl.b32", ar, ar, "7")
    hi = k.r("lhi", ".b32")
    k.ins("shr.u32", hi, lane, "4")
    for kk in range(4):
        k.ins("add.u32", t1, hi, str(kk * 2))
        k.ins("xor.b32", t1, t1, l7)
        k.ins("shl.b32", t1, t1, "4")
        k.ins("add.u32", alane[kk], ar, t1)
    # B: row wn*tn + (lane & 7) + 8 * (lane >> 4), chunk kk*2 + ((lane >> 3) & 1)
    k.ins("shl.b32", br, hi, "3")
    k.ins("add.u32", br, br, l7)
    k.ins("mad.lo.u32", br, wnr, str(tn), br)
    k.ins("add.u32", br, br, str(bm))
    k.ins("shl.b32", br, br, "7")
    b3 = k.r("lb3", ".b32")
    k.ins("shr.u32", b3, lane, "3")
    k.ins("and.b32", b3, b3, "1")
    for kk in range(4):
        k.ins("add.u32", t1, b3, str(kk * 2))
        k.ins("xor.b32", t1, t1, l7)
        k.ins("shl.b32", t1, t1, "4")
        k.ins("add.u32", blane[kk], br, t1)
    # accumulators
    acc = {}
    parts = ["g", "u"] if sw else ["d"]
    for pt in parts:
        for mi in range(MI):
            for ni in range(NI):
                for j in range(4):
                    rg = k.r(f"{pt}{mi}_{ni}_{j}", ".f32")
                    acc[(pt, mi, ni, j)] = rg
                    k.ins("mov.f32", rg, "0f00000000")
    # pipeline
    nk, kt, rd, wr = k.r("nk", ".b32"), k.r("kt", ".b32"), k.r("rd", ".b32"), k.r("wr", ".b32")
    k.ins("add.u32", nk, P["K"], str(BK - 1))
    k.ins("shr.u32", nk, nk, "6")
    km8 = k.r("km8", ".b32")
    k.ins("sub.u32", km8, P["K"], "8")
    kc, koff, kb = k.r("kc", ".b32"), k.r("koff", ".b64"), k.r("kb", ".b32")
    kp = k.r("kp", ".pred")
    src, bb = k.r("src", ".b64"), k.r("bb", ".b32")
    sa = k.r("sa", ".b32")

    def issue(tile_reg, stage_reg):
        # k offset of this thread's chunk, clamped inside the row
        k.ins("shl.b32", kc, tile_reg, "6")
        k.ins("add.u32", kc, kc, ccol)
        k.ins("setp.lt.u32", kp, kc, P["K"])
        k.ins("min.u32", kc, kc, km8)
        k.ins("mul.wide.u32", koff, kc, "2")
        k.ins("selp.u32", kb, "16", "0", kp)
        k.ins("mad.lo.u32", sa, stage_reg, str(stage), sb)
        k.ins("add.u32", sa, sa, d0)
        for i in range(a_per):
            k.ins("add.u64", src, f"%ap{i}", koff)
            k.ins("and.b32", bb, f"%ab{i}", kb)
            pr = apreds[i]
            k.ins("cp.async.cg.shared.global", f"[{sa}+{i * rstep * 128}]", f"[{src}]", "16", bb, pred=pr)
        for i in range(b_per):
            k.ins("add.u64", src, f"%bp{i}", koff)
            pr = bpreds[i]
            k.ins("cp.async.cg.shared.global", f"[{sa}+{(bm + i * rstep) * 128}]", f"[{src}]", "16", kb, pred=pr)

    # prologue: stages 0..S-2
    st = k.r("stg", ".b32")
    for s in range(S - 1):
        k.ins("setp.le.u32", q, nk, str(s))
        k.ins("bra.uni", f"PRO_{s}", pred=q)
        k.ins("mov.u32", st, str(s))
        issue(st, st)
        k.label(f"PRO_{s}")
        k.ins("cp.async.commit_group")
    k.ins("mov.u32", kt, "0")
    k.ins("mov.u32", rd, "0")
    k.ins("mov.u32", wr, str(S - 1))
    nxt = k.r("nxt", ".b32")
    k.label("LOOP")
    k.ins("setp.ge.u32", q, kt, nk)
    k.ins("bra.uni", "EPI", pred=q)
    k.ins("cp.async.wait_group", str(S - 2))
    k.ins("bar.sync", "0")
    k.ins("add.u32", nxt, kt, str(S - 1))
    k.ins("setp.ge.u32", q, nxt, nk)
    k.ins("bra.uni", "NOLOAD", pred=q)
    issue(nxt, wr)
    k.label("NOLOAD")
    k.ins("cp.async.commit_group")
    # compute stage rd
    rb = k.r("rb", ".b32")
    k.ins("mad.lo.u32", rb, rd, str(stage), sb)
    aa, ba = k.r("aa", ".b32"), k.r("ba", ".b32")
    for kk in range(4):
        k.ins("add.u32", aa, rb, alane[kk])
        k.ins("add.u32", ba, rb, blane[kk])
        af = {}
        for mi in range(MI):
            regs = [k.r(f"fa{mi}_{j}", ".b32") for j in range(4)]
            af[mi] = regs
            k.ins("ldmatrix.sync.aligned.m8n8.x4.shared.b16", "{" + ", ".join(regs) + "}", f"[{aa}+{mi * 2048}]")
        bf = {}
        for pi, pt in enumerate(parts):
            for nj in range(NI // 2):
                regs = [k.r(f"fb{pt}{nj}_{j}", ".b32") for j in range(4)]
                off = (nj * 16 + pi * bn) * 128
                k.ins("ldmatrix.sync.aligned.m8n8.x4.shared.b16", "{" + ", ".join(regs) + "}", f"[{ba}+{off}]")
                bf[(pt, 2 * nj)] = regs[0:2]
                bf[(pt, 2 * nj + 1)] = regs[2:4]
        for pt in parts:
            for mi in range(MI):
                for ni in range(NI):
                    d = [acc[(pt, mi, ni, j)] for j in range(4)]
                    k.ins(f"mma.sync.aligned.m16n8k16.row.col.f32.{dt}.{dt}.f32",
                          "{" + ", ".join(d) + "}", "{" + ", ".join(af[mi]) + "}",
                          "{" + ", ".join(bf[(pt, ni)]) + "}", "{" + ", ".join(d) + "}")
    k.ins("add.u32", kt, kt, "1")
    k.ins("add.u32", rd, rd, "1")
    k.ins("setp.eq.u32", q, rd, str(S))
    k.ins("mov.u32", rd, "0", pred=q)
    k.ins("add.u32", wr, wr, "1")
    k.ins("setp.eq.u32", q, wr, str(S))
    k.ins("mov.u32", wr, "0", pred=q)
    k.ins("bra.uni", "LOOP")
    # epilogue: fragment (mi, ni): rows wm*tm + mi*16 + g (+8), cols wn*tn + ni*8 + 2t
    k.label("EPI")
    k.ins("cp.async.wait_group", "0")
    gq, tq = k.r("gq", ".b32"), k.r("tq", ".b32")
    k.ins("shr.u32", gq, lane, "2")
    k.ins("and.b32", tq, lane, "3")
    prow, cbase, colr = k.r("prow", ".b32"), k.r("cbase", ".b32"), k.r("colr", ".b32")
    k.ins("mad.lo.u32", cbase, wnr, str(tn), n0)
    k.ins("shl.b32", t1, tq, "1")
    k.ins("add.u32", cbase, cbase, t1)
    for mi in range(MI):
        for h in range(2):
            lab = f"ER_{mi}_{h}"
            k.ins("mad.lo.u32", prow, wmr, str(tm), mb)
            k.ins("add.u32", prow, prow, gq)
            k.ins("add.u32", prow, prow, str(mi * 16 + h * 8))
            ro, wv = epilogue_row(k, P, prow, epi, lab)
            for ni in range(NI):
                k.ins("add.u32", colr, cbase, str(ni * 8))
                if sw:
                    v0, v1 = k.r("sv0", ".f32"), k.r("sv1", ".f32")
                    silu_mul(k, acc[("g", mi, ni, 2 * h)], acc[("u", mi, ni, 2 * h)], v0)
                    silu_mul(k, acc[("g", mi, ni, 2 * h + 1)], acc[("u", mi, ni, 2 * h + 1)], v1)
                else:
                    v0, v1 = acc[("d", mi, ni, 2 * h)], acc[("d", mi, ni, 2 * h + 1)]
                store_pair(k, epi, dt, ro, colr, P, v0, v1, wv, lab)
            k.label(lab)
    k.label("EXIT")
    k.ins("ret")
    k.emit("}")
    body = k.lines[body_start:]
    return k.lines[:body_start] + k.decls() + body


# ---------------------------------------------------------------------------
# Generation 2: wgmma + TMA
# ---------------------------------------------------------------------------
def gen_wgmma(cfg, epi, dt):
    bm, bn, S = cfg
    sw = epi == "swiglu"
    ncw = bm // 64  # consumer warpgroups
    nt = ncw * 128 + 32
    nb = bn * (2 if sw else 1)
    stage = (bm + nb) * 128
    box_rows = min(bn, 128)  # B box rows (the host's map uses the same rule)
    nbox = nb // box_rows  # B boxes per stage
    name = wg_name(cfg, epi, dt)
    # accumulator registers per part (gate/up for swiglu): bn/2 each
    parts = ["g", "u"] if sw else ["d"]
    nacc = bn // 2
    k = K()
    k.emit(f"// {name}: BM={bm} ({ncw} consumer warpgroup(s) of m64) BN={bn} "
           f"(weight rows per stage {nb}), {S} stages of {stage} B, {nt} threads")
    k.emit(f".visible .entry {name}(.param .align 64 .b8 p[384])")
    k.emit(f".maxntid {nt}, 1, 1")
    k.emit("{")
    body_start = len(k.lines)
    P = load_params(k, 256)
    tid, lane, warp = k.r("thr", ".b32"), k.r("lane", ".b32"), k.r("warp", ".b32")
    q = k.r("q", ".pred")
    k.ins("mov.u32", tid, "%tid.x")
    k.ins("and.b32", lane, tid, "31")
    k.ins("shr.u32", warp, tid, "5")
    # persistent: tiles ctaid.x, ctaid.x + nctaid.x, ... of (len / BM) * ntiles
    tile, ntile, tstep = k.r("tile", ".b32"), k.r("ntile", ".b32"), k.r("tstep", ".b32")
    k.ins("div.u32", ntile, P["len"], str(bm))
    k.ins("mul.lo.u32", ntile, ntile, P["ntiles"])
    k.ins("mov.u32", tstep, "%nctaid.x")
    # 1024-aligned stage ring, then the barriers
    sb, bar = k.r("sbase", ".b32"), k.r("bars", ".b32")
    k.ins("mov.u32", sb, "gsm")
    k.ins("add.u32", sb, sb, "1023")
    k.ins("and.b32", sb, sb, "-1024")
    k.ins("add.u32", bar, sb, str(S * stage))  # full[S] then empty[S]
    nk = k.r("nk", ".b32")
    k.ins("add.u32", nk, P["K"], str(BK - 1))
    k.ins("shr.u32", nk, nk, "6")
    # init barriers
    k.ins("setp.ne.u32", q, tid, "0")
    k.ins("bra.uni", "INIT_DONE", pred=q)
    for s in range(S):
        k.ins("mbarrier.init.shared::cta.b64", f"[{bar}+{s * 8}]", "1")
        k.ins("mbarrier.init.shared::cta.b64", f"[{bar}+{(S + s) * 8}]", str(ncw * 4))
    k.ins("fence.mbarrier_init.release.cluster")
    k.ins("fence.proxy.async.shared::cta")
    k.label("INIT_DONE")
    k.ins("bar.sync", "0")
    kt, s_, ph, fb, eb, ps = (k.r(n, ".b32") for n in ["kt", "s", "ph", "fb", "eb", "ps"])
    k.ins("setp.lt.u32", q, warp, str(ncw * 4))
    k.ins("bra.uni", "CONSUMER", pred=q)
    # ---------------- producer warp: lane 0 issues every TMA load
    k.ins("setp.ne.u32", q, lane, "0")
    k.ins("bra.uni", "EXIT", pred=q)
    pa = k.r("pa", ".b64")
    k.ins("mov.u64", pa, "p")
    k.ins("cvta.param.u64", pa, pa)
    pbm = k.r("pbmap", ".b64")
    k.ins("add.u64", pbm, pa, "128")
    k.ins("prefetch.tensormap", f"[{pa}]")
    k.ins("prefetch.tensormap", f"[{pbm}]")
    k.ins("mov.u32", s_, "0")
    k.ins("mov.u32", ph, "0")
    k.ins("mov.u32", tile, "%ctaid.x")
    k.label("PT_LOOP")
    k.ins("setp.ge.u32", q, tile, ntile)
    k.ins("bra.uni", "EXIT", pred=q)
    mb, n0, e = raster(k, P, bm, bn, "PT_NEXT", pid=tile)
    # B row coordinates
    nw, rb0 = k.r("nw", ".b32"), k.r("rb0", ".b32")
    k.ins("shl.b32", nw, P["N"], "1" if sw else "0")
    k.ins("mad.lo.u32", rb0, e, nw, n0)
    brows = []
    for j in range(nbox):
        rj = k.r(f"rbj{j}", ".b32")
        if sw:
            half = j * box_rows // bn  # 0 gate, 1 up
            within = j * box_rows - half * bn
            k.ins("add.u32", rj, rb0, str(within))
            if half:
                k.ins("add.u32", rj, rj, P["N"])
        else:
            k.ins("add.u32", rj, rb0, str(j * box_rows))
        brows.append(rj)
    k.ins("mov.u32", kt, "0")
    kx, dst, t1 = k.r("kx", ".b32"), k.r("dst", ".b32"), k.r("t1", ".b32")
    k.label("PLOOP")
    k.ins("setp.ge.u32", q, kt, nk)
    k.ins("bra.uni", "PT_NEXT", pred=q)
    k.ins("mad.lo.u32", eb, s_, "8", bar)
    k.ins("add.u32", eb, eb, str(S * 8))
    k.ins("xor.b32", t1, ph, "1")
    k.label("PWAIT")
    k.ins("mbarrier.try_wait.parity.shared::cta.b64", q, f"[{eb}]", t1)
    k.ins("bra.uni", "PWAIT", pred="!" + q)
    k.ins("mad.lo.u32", fb, s_, "8", bar)
    k.ins("mbarrier.arrive.expect_tx.shared::cta.b64", "_", f"[{fb}]", str(stage))
    k.ins("shl.b32", kx, kt, "6")
    k.ins("mad.lo.u32", dst, s_, str(stage), sb)
    k.ins("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes",
          f"[{dst}]", f"[{pa}, {{{kx}, {mb}}}]", f"[{fb}]")
    for j in range(nbox):
        k.ins("add.u32", t1, dst, str(bm * 128 + j * box_rows * 128))
        k.ins("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes",
              f"[{t1}]", f"[{pbm}, {{{kx}, {brows[j]}}}]", f"[{fb}]")
    k.ins("add.u32", kt, kt, "1")
    k.ins("add.u32", s_, s_, "1")
    k.ins("setp.eq.u32", q, s_, str(S))
    k.ins("mov.u32", s_, "0", pred=q)
    k.ins("xor.b32", ph, ph, "1", pred=q)
    k.ins("bra.uni", "PLOOP")
    k.label("PT_NEXT")
    k.ins("add.u32", tile, tile, tstep)
    k.ins("bra.uni", "PT_LOOP")
    # ---------------- consumers
    k.label("CONSUMER")
    cw, wl = k.r("cw", ".b32"), k.r("wl", ".b32")
    k.ins("shr.u32", cw, warp, "2")
    k.ins("and.b32", wl, warp, "3")
    # descriptors: start >> 4 in bits 0..13, LBO 1, SBO 1024 >> 4, 128B swizzle
    da, db, t64 = k.r("da", ".b64"), k.r("db", ".b64"), k.r("t64", ".b64")
    k.ins("shr.u32", t1, sb, "4")
    k.ins("mad.lo.u32", t1, cw, str(64 * 128 // 16), t1)
    k.ins("cvt.u64.u32", da, t1)
    k.ins("or.b64", da, da, "0x4000004000010000")
    k.ins("shr.u32", t1, sb, "4")
    k.ins("add.u32", t1, t1, str(bm * 128 // 16))
    k.ins("cvt.u64.u32", db, t1)
    k.ins("or.b64", db, db, "0x4000004000010000")
    dA, dB, dB2 = k.r("dA", ".b64"), k.r("dB", ".b64"), k.r("dB2", ".b64")
    pz, po = k.r("pz", ".pred"), k.r("po", ".pred")
    k.ins("setp.ne.u32", pz, tid, tid)
    k.ins("setp.eq.u32", po, tid, tid)
    accs = {pt: [k.r(f"{pt}{i}", ".f32") for i in range(nacc)] for pt in parts}
    shape = f"m64n{bn}k16"
    # One m64n(2*BN) wgmma over the contiguous gate and up rows measured
    # 6-10% slower than two m64nBN ones on the H100 (2026-11-24 runs), so
    # the generator keeps two.
    one_mma = False

    def kblock(first):
        # wait full[s]
        k.ins("mad.lo.u32", fb, s_, "8", bar)
        lab = "FW0" if first else "FW"
        k.label(lab)
        k.ins("mbarrier.try_wait.parity.shared::cta.b64", q, f"[{fb}]", ph)
        k.ins("bra.uni", lab, pred="!" + q)
        k.ins("mul.lo.u32", t1, s_, str(stage // 16))
        k.ins("cvt.u64.u32", t64, t1)
        k.ins("add.u64", dA, da, t64)
        k.ins("add.u64", dB, db, t64)
        if sw and not one_mma:
            k.ins("add.u64", dB2, dB, str(bn * 128 // 16))
        k.ins("wgmma.fence.sync.aligned")
        for kk in range(4):
            sc = pz if (first and kk == 0) else po
            if one_mma:
                # gate rows then up rows are contiguous in the stage: one
                # m64n(2*BN) wgmma fills both accumulator sets (registers
                # 0 .. BN/2-1 are the gate columns, the rest the up ones)
                regs = [r for pt in parts for r in accs[pt]]
                k.ins(f"wgmma.mma_async.sync.aligned.m64n{nb}k16.f32.{dt}.{dt}",
                      "{" + ", ".join(regs) + "}", f"{dA}", f"{dB}", sc, "1", "1", "0", "0")
            else:
                for pi, pt in enumerate(parts):
                    bdesc = dB if pi == 0 else dB2
                    k.ins(f"wgmma.mma_async.sync.aligned.{shape}.f32.{dt}.{dt}",
                          "{" + ", ".join(accs[pt]) + "}", f"{dA}", f"{bdesc}", sc, "1", "1", "0", "0")
            if kk < 3:
                k.ins("add.u64", dA, dA, "2")
                k.ins("add.u64", dB, dB, "2")
                if sw and not one_mma:
                    k.ins("add.u64", dB2, dB2, "2")
        k.ins("wgmma.commit_group.sync.aligned")
        # Keep this k-block's group in flight; the previous one is done
        # now, so its stage goes back to the producer.
        k.ins("wgmma.wait_group.sync.aligned", "1")
        if not first:
            k.ins("setp.eq.u32", q, lane, "0")
            k.ins("mad.lo.u32", eb, ps, "8", bar)
            k.ins("add.u32", eb, eb, str(S * 8))
            k.ins("mbarrier.arrive.shared::cta.b64", "_", f"[{eb}]", pred=q)
        k.ins("mov.u32", ps, s_)
        k.ins("add.u32", kt, kt, "1")
        k.ins("add.u32", s_, s_, "1")
        k.ins("setp.eq.u32", q, s_, str(S))
        k.ins("mov.u32", s_, "0", pred=q)
        k.ins("xor.b32", ph, ph, "1", pred=q)

    k.ins("mov.u32", s_, "0")
    k.ins("mov.u32", ph, "0")
    k.ins("mov.u32", tile, "%ctaid.x")
    k.label("CT_LOOP")
    k.ins("setp.ge.u32", q, tile, ntile)
    k.ins("bra.uni", "EXIT", pred=q)
    mb, n0, e = raster(k, P, bm, bn, "CT_NEXT", pid=tile)
    k.ins("mov.u32", kt, "0")
    kblock(True)
    k.label("CLOOP")
    k.ins("setp.ge.u32", q, kt, nk)
    k.ins("bra.uni", "CEPI", pred=q)
    kblock(False)
    k.ins("bra.uni", "CLOOP")
    k.label("CEPI")
    k.ins("wgmma.wait_group.sync.aligned", "0")
    # the tile's last stage goes back to the producer (it may already be
    # loading the next tile while this one's epilogue runs)
    k.ins("setp.eq.u32", q, lane, "0")
    k.ins("mad.lo.u32", eb, ps, "8", bar)
    k.ins("add.u32", eb, eb, str(S * 8))
    k.ins("mbarrier.arrive.shared::cta.b64", "_", f"[{eb}]", pred=q)
    # epilogue: reg i -> row 16*wl + (lane>>2) + 8*((i>>1)&1), col 8*(i>>2) + 2*(lane&3) + (i&1)
    gq, tq = k.r("gq", ".b32"), k.r("tq", ".b32")
    k.ins("shr.u32", gq, lane, "2")
    k.ins("and.b32", tq, lane, "3")
    prow, cbase, colr = k.r("prow", ".b32"), k.r("cbase", ".b32"), k.r("colr", ".b32")
    k.ins("shl.b32", t1, tq, "1")
    k.ins("add.u32", cbase, n0, t1)
    for h in range(2):
        lab = f"ER_{h}"
        k.ins("mad.lo.u32", prow, cw, "64", mb)
        k.ins("mad.lo.u32", prow, wl, "16", prow)
        k.ins("add.u32", prow, prow, gq)
        k.ins("add.u32", prow, prow, str(8 * h))
        ro, wv = epilogue_row(k, P, prow, epi, lab)
        for j in range(bn // 8):
            i0 = 4 * j + 2 * h
            k.ins("add.u32", colr, cbase, str(8 * j))
            if sw:
                v0, v1 = k.r("sv0", ".f32"), k.r("sv1", ".f32")
                silu_mul(k, accs["g"][i0], accs["u"][i0], v0)
                silu_mul(k, accs["g"][i0 + 1], accs["u"][i0 + 1], v1)
            else:
                v0, v1 = accs["d"][i0], accs["d"][i0 + 1]
            store_pair(k, epi, dt, ro, colr, P, v0, v1, wv, lab)
        k.label(lab)
    k.label("CT_NEXT")
    k.ins("add.u32", tile, tile, tstep)
    k.ins("bra.uni", "CT_LOOP")
    k.label("EXIT")
    k.ins("ret")
    k.emit("}")
    body = k.lines[body_start:]
    return k.lines[:body_start] + k.decls() + body


def smem_mma(cfg, epi):
    bm, bn, wm, wn, s = cfg
    nb = bn * (2 if epi == "swiglu" else 1)
    return s * (bm + nb) * 128


def smem_wg(cfg, epi):
    bm, bn, s = cfg
    nb = bn * (2 if epi == "swiglu" else 1)
    return s * (bm + nb) * 128 + 1024 + 16 * s


HEADER_MMA = """// moe_mma.ptx: GENERATED by ptx/gen/moe_gemm.py (do not edit; rerun it).
// Generation 1 of the grouped expert GEMMs: mma.sync m16n8k16 (f32
// accumulation) fed by ldmatrix from XOR-swizzled shared memory (16-byte
// chunk c of a 128-byte row r lives at chunk c ^ (r & 7)), loaded by a
// multi-stage cp.async pipeline (16-byte copies, zero-filled for padding
// rows and the K tail). A rows are gathered inside the kernel: position p of
// the block-padded plan reads token sorted[p] / ktop (GEMM1) or row p of an
// activation already in plan order (ktop = 0, GEMM2).
//
// Reference: medley_core::moe::layer::moe_layer (GEMM1 = gate/up + SwiGLU,
// GEMM2 = down projection times the routing weight); the combine back to
// token order is routing.ptx's moe_combine.
//
// Tested by cuda/tests/experts.rs: expert_gemms_match_the_cpu_layer (every
// entry this device loads, through experts::layer, i.e. experts::gemm1 and
// experts::gemm2, against medley_core::moe::layer::moe_layer),
// gemm1_gathered_and_in_plan_order_agree_bitwise (experts::gemm1 gathered
// vs in plan order), every_gemm_entry_has_a_consistent_table_row and
// bad_expert_gemm_calls_are_refused.
//
// Parameters (by value, 104 bytes, cuda/src/experts.rs GemmParams):
{params}
// Launch: 1-D grid of (len / BM) * ntiles blocks (grouped raster: group_m
// M blocks share a sweep over the N tiles), the entry's thread count, and
// STAGES * (BM + NB) * 128 bytes of dynamic shared memory.
//
// .version 7.0 / .target sm_80 (cp.async, ldmatrix, mma.sync bf16).

.version 7.0
.target sm_80
.address_size 64

.extern .shared .align 128 .b8 gsm[];
"""

HEADER_WG = """// moe_wgmma.ptx: GENERATED by ptx/gen/moe_gemm.py (do not edit; rerun it).
// requires sm_90a
// Generation 2 of the grouped expert GEMMs: wgmma.mma_async m64nNk16 (f32
// accumulators in registers) reading both operands from 128-byte swizzled
// shared memory through matrix descriptors (K-major, SBO 1024), filled by
// TMA (cp.async.bulk.tensor.2d) over a ring of STAGES stages guarded by
// full/empty mbarriers. Warps 0 .. 4*CW-1 are CW consumer warpgroups (64 rows
// each); the last warp is the producer (its lane 0 issues every load).
// Persistent: block b takes tiles b, b + gridDim.x, ...; the stage ring and
// its phases run on across tiles, so the producer loads the next tile while
// the consumers store this one.
// A must be in plan order (routing.ptx's moe_permute for GEMM1; GEMM1's output
// for GEMM2): TMA cannot gather rows. Epilogues and parameters as in
// moe_mma.ptx; the block's plan rows and experts come from the same tables.
//
// Tested (on compute capability 9.0, where this module loads) by
// cuda/tests/experts.rs: expert_gemms_match_the_cpu_layer (every entry,
// one block per tile and persistent, through experts::layer, i.e.
// experts::gemm1 and experts::gemm2, against
// medley_core::moe::layer::moe_layer), every_gemm_entry_has_a_consistent_table_row
// and bad_expert_gemm_calls_are_refused.
//
// Parameters (by value, 384 bytes, cuda/src/experts.rs WgParams):
//    0  128 B  tensor map of A    (u16 [len, K] rows, box {{64, BM}}, 128B swizzle)
//  128  128 B  tensor map of W    (u16 [L * NW, K], box {{64, min(BN, 128)}}, 128B swizzle)
//  256  the moe_mma.ptx parameter block, offsets + 256:
{params}
//  360  24 bytes of padding
// Launch: any grid (at most one block per tile helps; the launcher uses
// min(tiles, SMs * resident blocks)), the entry's thread count, and
// STAGES * (BM + NB) * 128 + 1024 + 16 * STAGES bytes of dynamic shared
// memory (the ring is aligned to 1024 at run time).
//
// .version 8.0 / .target sm_90a (wgmma, TMA, mbarrier expect_tx/try_wait).

.version 8.0
.target sm_90a
.address_size 64

.extern .shared .align 1024 .b8 gsm[];
"""


def build():
    mma = [HEADER_MMA.format(params=PARAM_DOC)]
    wg = [HEADER_WG.format(params=PARAM_DOC)]
    table = []
    for dt in DTYPES:
        for epi in EPIS:
            for cfg in MMA_CONFIGS:
                if not mma_valid(cfg, epi):
                    continue
                mma.append("\n".join(gen_mma(cfg, epi, dt)) + "\n")
                bm, bn, wm, wn, s = cfg
                table.append(("Mma", epi, dt, bm, bn, wm, wn, s, 32 * wm * wn, smem_mma(cfg, epi), mma_name(cfg, epi, dt), False))
            for cfg in WGMMA_CONFIGS:
                if not wg_valid(cfg, epi):
                    continue
                wg.append("\n".join(gen_wgmma(cfg, epi, dt)) + "\n")
                bm, bn, s = cfg
                for persistent in (False, True):
                    table.append(("Wgmma", epi, dt, bm, bn, bm // 64, 1, s, (bm // 64) * 128 + 32, smem_wg(cfg, epi),
                                  wg_name(cfg, epi, dt), persistent))
    rs = ["//! GENERATED by ptx/gen/moe_gemm.py (do not edit; rerun it): one row per",
          "//! expert-GEMM launch configuration of ptx/moe_mma.ptx and ptx/moe_wgmma.ptx",
          "//! (each wgmma entry twice: one block per tile, and persistent).",
          "",
          "use crate::specs::{Epilogue, GemmConfig, GemmDtype, Generation};",
          "",
          "/// Every expert-GEMM launch configuration, in registry order.",
          "#[rustfmt::skip]",
          f"pub const GEMMS: [GemmConfig; {len(table)}] = ["]
    for g, epi, dt, bm, bn, wm, wn, s, th, sm, nm, pers in table:
        label = nm + ("_persistent" if pers else "")
        rs.append(
            f"    GemmConfig {{ generation: Generation::{g}, epilogue: Epilogue::{'SwiGlu' if epi == 'swiglu' else 'Down'}, "
            f"dtype: GemmDtype::{'BF16' if dt == 'bf16' else 'F16'}, bm: {bm}, bn: {bn}, warps_m: {wm}, warps_n: {wn}, "
            f"stages: {s}, threads: {th}, smem: {sm}, persistent: {'true' if pers else 'false'}, "
            f"entry: c\"{nm}\", label: \"{label}\" }},")
    rs.append("];")
    return "".join(mma), "".join(wg), "\n".join(rs) + "\n"


def main():
    files = dict(zip(["ptx/moe_mma.ptx", "ptx/moe_wgmma.ptx", "cuda/src/gemm_table.rs"], build()))
    stale = []
    for path, text in files.items():
        full = os.path.join(ROOT, path)
        if "--write" in sys.argv:
            with open(full, "w") as f:
                f.write(text)
        else:
            try:
                cur = open(full).read()
            except FileNotFoundError:
                cur = None
            if cur != text:
                stale.append(path)
    if stale:
        print("stale (run ptx/gen/moe_gemm.py --write):", " ".join(stale))
        sys.exit(1)


if __name__ == "__main__":
    main()
