#!/usr/bin/env python3
"""Generates ptx/gating_v2.ptx, the tuned top-k gating kernels:
`gate_topk_v2` (softmax then top-k; top-k then softmax) and
`gate_grouped_v2` (DeepSeek-V3 style grouped, biased routing).

Usage (any directory): `python3 ptx/gen/gating_v2.py --write` writes
ptx/gating_v2.ptx; without `--write` it only checks that the checked-in file
is current (exit 1 if not), as CI does (.ci/run). Runs only under the pinned
Python (PYTHON below) so that regeneration is byte-identical.

Same parameters, launch shape and bit-exact contract as `gate_topk` (the
straightforward kernel of ptx/gating.ptx, kept as the on-device reference);
what changes is where the work happens:

- the lane's logits stay in registers as order keys (slot s = 8 * it + j
  holds element 256 * it + 8 * lane + j), so each selection round scans
  registers, not shared memory, and the round's winner pops its slot
  (key 0 sorts below every real key) instead of every lane re-checking
  "strictly after the previous pick";
- everything else is unrolled straight-line code (no .func calls): the
  warp-order sums issue their shared loads and exponentials 8 at a time and
  add in the contract's order; the sums over the k picks shuffle all k
  values first, then add in j order; grouped routing loads the bias of a
  lane's 8 slots together and scores groups with 2 independent top-2
  chains per group.

E <= 256 * BLOCKS (two register blocks of 8 slots: 512); the launcher
runs `gate_topk` above that. Modes 0/1 and mode 2 are separate entries so
that each gets its own register allocation (40 with .maxnreg, no spills,
vs 64 for grouped routing).
"""
import os
import sys

# The Python this generator is pinned to: the output is checked in and CI
# compares it byte for byte, so it is only ever produced by this version.
PYTHON = (3, 11)
if sys.version_info[:2] != PYTHON:
    sys.exit(
        "ptx/gen/gating_v2.py: pinned to Python %d.%d, running under %d.%d: run it "
        "with python%d.%d, or move the pin (PYTHON here) in a commit of its own that "
        "also shows `--write` leaves ptx/gating_v2.ptx unchanged" % (PYTHON + sys.version_info[:2] + PYTHON)
    )

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BLOCKS = 2  # register blocks of 8 slots: E <= 256 * BLOCKS
MAXE = 256 * BLOCKS

out = []
regs = {}  # name -> type


def r(name, ty):
    """Declares register `name` (without %) of type `ty`; returns '%name'."""
    if name in regs:
        assert regs[name] == ty, (name, ty, regs[name])
    regs[name] = ty
    return "%" + name


def emit(s=""):
    out.append(s)


def ins(op, *args, pred=None):
    p = f"@{pred} " if pred else ""
    emit(f"    {p}{op:<15} " + ", ".join(args) + ";" if args else f"    {p}{op};")


def label(name):
    emit(f"{name}:")


def comment(s):
    emit(f"    // {s}")


def K(s):
    return r(f"K{s}", "b32")


# ---------------------------------------------------------------- helpers
def cexp(dst, x, t):
    """dst = crate::math::exp(x), operation for operation (temps tagged t)."""
    q = r(f"ceq{t}", "pred")
    n, h, tt_ = r(f"cen{t}", "b32"), r(f"ceh{t}", "b32"), r(f"cet{t}", "b32")
    xc, tt, nf = r(f"cexc{t}", "f32"), r(f"cett{t}", "f32"), r(f"cenf{t}", "f32")
    rr, r2, p, y = r(f"cer{t}", "f32"), r(f"cer2{t}", "f32"), r(f"cep{t}", "f32"), r(f"cey{t}", "f32")
    s1, s2 = r(f"ces1{t}", "f32"), r(f"ces2{t}", "f32")
    # the input is read again by the final selects: keep it (dst may alias x)
    xin = r(f"cex{t}", "f32")
    ins("mov.f32", xin, x)
    x = xin
    ins("setp.gt.f32", q, x, "0fC2AEAC4F")
    ins("selp.f32", xc, x, "0fC2AEAC4F", q)
    ins("setp.lt.f32", q, xc, "0f42B17217")
    ins("selp.f32", xc, xc, "0f42B17217", q)
    ins("mul.rn.f32", tt, xc, "0f3FB8AA3B")
    ins("add.rn.f32", tt, tt, "0f4B400000")
    ins("mov.b32", n, tt)
    ins("sub.s32", n, n, "0x4B400000")
    ins("sub.rn.f32", nf, tt, "0f4B400000")
    ins("mul.rn.f32", rr, nf, "0f3F318000")
    ins("sub.rn.f32", rr, xc, rr)
    ins("mul.rn.f32", y, nf, "0fB95E8083")
    ins("sub.rn.f32", rr, rr, y)
    ins("mul.rn.f32", r2, rr, rr)
    ins("mul.rn.f32", p, "0f39506967", rr)
    ins("add.rn.f32", p, p, "0f3AB743CE")
    ins("mul.rn.f32", p, p, rr)
    ins("add.rn.f32", p, p, "0f3C088908")
    ins("mul.rn.f32", p, p, rr)
    ins("add.rn.f32", p, p, "0f3D2AA9C1")
    ins("mul.rn.f32", p, p, rr)
    ins("add.rn.f32", p, p, "0f3E2AAAAA")
    ins("mul.rn.f32", p, p, rr)
    ins("add.rn.f32", p, p, "0f3F000000")
    ins("mul.rn.f32", y, p, r2)
    ins("add.rn.f32", y, y, rr)
    ins("add.rn.f32", y, y, "0f3F800000")
    ins("shr.s32", h, n, "1")
    ins("add.s32", tt_, h, "127")
    ins("shl.b32", tt_, tt_, "23")
    ins("mov.b32", s1, tt_)
    ins("sub.s32", tt_, n, h)
    ins("add.s32", tt_, tt_, "127")
    ins("shl.b32", tt_, tt_, "23")
    ins("mov.b32", s2, tt_)
    ins("mul.rn.f32", y, y, s1)
    ins("mul.rn.f32", dst, y, s2)
    ins("setp.lt.f32", q, x, "0fC2AEAC4F")
    ins("mov.f32", dst, "0f00000000", pred=q)
    ins("setp.gt.f32", q, x, "0f42B17217")
    ins("mov.f32", dst, "0f7F800000", pred=q)
    ins("setp.nan.f32", q, x, x)
    ins("mov.f32", dst, x, pred=q)


def fkey(dst, x, t):
    """dst = order key of x (canonicalized: -0 -> +0)."""
    q, z, b = r(f"fkq{t}", "pred"), r(f"fkz{t}", "f32"), r(f"fkb{t}", "b32")
    ins("add.rn.f32", z, x, "0f00000000")
    ins("mov.b32", b, z)
    ins("setp.lt.s32", q, b, "0")
    ins("not.b32", dst, b, pred=q)
    ins("or.b32", dst, b, "0x80000000", pred=f"!{q}")


def fromkey(dst, key, t):
    q, b = r(f"frq{t}", "pred"), r(f"frb{t}", "b32")
    ins("setp.lt.s32", q, key, "0")
    ins("xor.b32", b, key, "0x80000000", pred=q)
    ins("not.b32", b, key, pred=f"!{q}")
    ins("mov.b32", dst, b)


def gscore(dst, x, t):
    """Grouped routing's score of x (scoring, m, sum, inv_inf uniform)."""
    q, y = r(f"gsq{t}", "pred"), r(f"gsy{t}", "f32")
    lab = f"V2_GS{gscore.n}"
    gscore.n += 1
    emit(f"    @%sigm bra      {lab}_SIG;")
    # softmax: the +inf limit when m = +inf, else exp(x - m) / sum
    emit(f"    @%minf bra      {lab}_INF;")
    ins("sub.rn.f32", y, x, "%m")
    cexp(y, y, t)
    ins("div.rn.f32", dst, y, "%sum")
    emit(f"    bra.uni         {lab}_END;")
    label(f"{lab}_INF")
    ins("setp.eq.f32", q, x, "0f7F800000")
    ins("selp.f32", dst, "%inv_inf", "0f00000000", q)
    emit(f"    bra.uni         {lab}_END;")
    label(f"{lab}_SIG")
    ins("neg.f32", y, x)
    cexp(y, y, t)
    ins("add.rn.f32", y, y, "0f3F800000")
    ins("div.rn.f32", dst, "0f3F800000", y)
    label(f"{lab}_END")


gscore.n = 0


def warp_sum_exp(dst, base, mval, tag, width=8):
    """dst = the contract's warp-order sum of exp(x_e - mval) over e < E,
    x_e read from shared keys at `base` (lane l: e = l, l + 32, ...; then an
    xor butterfly). Loads and exponentials 8 at a time, adds in order."""
    ins("mov.f32", dst, "0f00000000")
    for b in range(8 * BLOCKS // width):  # width elements per lane per step
        ins("setp.le.u32", "%q", "%E", str(32 * width * b))
        emit(f"    @%q bra         V2_WS{tag}_TREE;")
        ks = []
        for i in range(width):
            e = 32 * width * b + 32 * i
            pe = r(f"wsp{i}", "pred")
            a = r(f"wsa{i}", "b32")
            kk = r(f"wsk{i}", "b32")
            ins("add.u32", a, "%lane", str(e))
            ins("setp.lt.u32", pe, a, "%E")
            ins("shl.b32", a, a, "2")
            ins("add.u32", a, a, base)
            ins("mov.u32", kk, "0x007FFFFF")  # -inf: exp gives 0, not added anyway
            ins("ld.shared.u32", kk, f"[{a}]", pred=pe)
            ks.append((pe, kk))
        vals = []
        for i, (pe, kk) in enumerate(ks):
            x = r(f"wsx{i}", "f32")
            fromkey(x, kk, f"w{i}")
            ins("sub.rn.f32", x, x, mval)
            v = r(f"wsv{i}", "f32")
            cexp(v, x, f"w{i}")
            vals.append((pe, v))
        for pe, v in vals:
            ins("add.rn.f32", dst, dst, v, pred=pe)
    label(f"V2_WS{tag}_TREE")
    o = r("wso", "f32")
    for s in (16, 8, 4, 2, 1):
        ins("shfl.sync.bfly.b32", o, dst, str(s), "0x1f", "0xffffffff")
        ins("add.rn.f32", dst, dst, o)


def seq_sum(dst, x, tag):
    """dst = sum over lanes j < k of x, sequential in j (every lane)."""
    ins("mov.f32", dst, "0f00000000")
    for b in range(4):
        ins("setp.le.u32", "%q", "%k", str(8 * b))
        emit(f"    @%q bra         V2_SS{tag}_END;")
        vs = []
        for i in range(8):
            j = 8 * b + i
            v = r(f"ssv{i}", "f32")
            ins("shfl.sync.idx.b32", v, x, str(j), "0x1f", "0xffffffff")
            vs.append((j, v))
        for j, v in vs:
            pj = r("ssp", "pred")
            ins("setp.gt.u32", pj, "%k", str(j))
            ins("add.rn.f32", dst, dst, v, pred=pj)
    label(f"V2_SS{tag}_END")


def each_slot(keys, skip_to):
    """Yields (slot, register) over `keys` (blocks of 8 slots), skipping to
    `skip_to` when E ends before block b (uniform; no skip for one block)."""
    for b, block in enumerate(keys):
        if b > 0:
            ins("setp.le.u32", "%q", "%E", str(256 * b))
            emit(f"    @%q bra         {skip_to};")
        for j, reg in enumerate(block):
            yield 8 * b + j, reg


def lane_best(keys, skip_to):
    """%bk, %bs = the lane's largest key and its slot (strict >: the lowest
    slot, i.e. the lowest index, among equal keys); 0, 0 when none."""
    ins("mov.u32", "%bk", "0")
    ins("mov.u32", "%bs", "0")
    for s, reg in each_slot(keys, skip_to):
        ins("setp.gt.u32", "%q", reg, "%bk")
        ins("selp.b32", "%bk", reg, "%bk", "%q")
        ins("selp.b32", "%bs", str(s), "%bs", "%q")
    if len(keys) > 1:
        label(skip_to)


def pop_winner(keys, skip_to):
    """The lane whose candidate %t won (%qw) zeroes the key of slot %bs."""
    for s, reg in each_slot(keys, skip_to):
        ins("setp.eq.and.u32", "%q", "%bs", str(s), "%qw")
        ins("mov.u32", reg, "0", pred="%q")
    if len(keys) > 1:
        label(skip_to)


def expert_keys():
    return [[K(8 * b + j) for j in range(8)] for b in range(BLOCKS)]


def select_rounds(tag, record_key):
    """k rounds of selection over the register keys; lane j < k gets pick j
    (%myi, and %myk when record_key)."""
    ins("mov.u32", "%j", "0")
    label(f"V2_SEL{tag}")
    ins("setp.ge.u32", "%q", "%j", "%k")
    emit(f"    @%q bra         V2_SEL{tag}_DONE;")
    lane_best(expert_keys(), f"V2_SEL{tag}_SCANNED")
    ins("redux.sync.max.u32", "%rk", "%bk", "0xffffffff")
    # the element of the lane's best: 256 * (bs / 8) + 8 * lane + bs % 8
    ins("shr.u32", "%t", "%bs", "3")
    ins("shl.b32", "%t", "%t", "8")
    ins("add.u32", "%t", "%t", "%lane8")
    ins("and.b32", "%u", "%bs", "7")
    ins("add.u32", "%t", "%t", "%u")
    ins("setp.eq.u32", "%q", "%bk", "%rk")
    ins("selp.b32", "%t", "%t", "0xFFFFFFFF", "%q")
    ins("redux.sync.min.u32", "%ri", "%t", "0xffffffff")
    # the winner pops its slot
    ins("setp.eq.u32", "%qw", "%t", "%ri")
    pop_winner(expert_keys(), f"V2_SEL{tag}_POPPED")
    ins("setp.eq.u32", "%q", "%lane", "%j")
    if record_key:
        ins("mov.u32", "%myk", "%rk", pred="%q")
    ins("mov.u32", "%myi", "%ri", pred="%q")
    ins("add.u32", "%j", "%j", "1")
    emit(f"    bra.uni         V2_SEL{tag};")
    label(f"V2_SEL{tag}_DONE")


def load16(xs, op, lab):
    """xs[0..8] = 8 16-bit values at [%a] as f32, by one 16-byte `op` (bf16
    by a shift, f16 by cvt); ends on the f16 path, which falls through to
    the caller's `{lab}_GOT` (the bf16 path branches there)."""
    ws = [r(f"w{i}", "b32") for i in range(4)]
    emit(f"    {op} {{{ws[0]}, {ws[1]}, {ws[2]}, {ws[3]}}}, [%a];")
    emit(f"    @%isf16 bra     {lab}_F16;")
    for i in range(4):
        ins("shl.b32", "%t", ws[i], "16")
        ins("mov.b32", xs[2 * i], "%t")
        ins("and.b32", "%t", ws[i], "-65536")
        ins("mov.b32", xs[2 * i + 1], "%t")
    emit(f"    bra.uni         {lab}_GOT;")
    label(f"{lab}_F16")
    for i in range(4):
        ins("mov.b32", "{%h0, %h1}", ws[i])
        ins("cvt.f32.f16", xs[2 * i], "%h0")
        ins("cvt.f32.f16", xs[2 * i + 1], "%h1")


# ------------------------------------------------------------------ kernel
def body(grouped):
    comment("the row: keys into registers (and shared memory, index order)")
    ins("mul.wide.u32", "%o", "%row", "%stride")
    ins("shl.b64", "%o", "%o", "2", pred="%isf32")
    ins("shl.b64", "%o", "%o", "1", pred="!%isf32")
    ins("add.u64", "%rowp", "%logits", "%o")
    ins("setp.ne.u32", "%nan", "0", "0")
    ins("mov.u32", "%ninf", "0")
    ins("mov.f32", "%m", "0fFF800000")
    for s in range(8 * BLOCKS):
        ins("mov.u32", K(s), "0")
    for b in range(BLOCKS):
        xs = [r(f"x{j}", "f32") for j in range(8)]
        lab = f"V2_LD{b}"
        ins("add.u32", "%e", "%lane8", str(256 * b))
        ins("setp.ge.u32", "%q", "%e", "%E")
        emit(f"    @%q bra         V2_LOADED;")
        ins("sub.u32", "%nv", "%E", "%e")
        ins("min.u32", "%nv", "%nv", "8")
        ins("cvt.u64.u32", "%o", "%e")
        ins("shl.b64", "%o", "%o", "2", pred="%isf32")
        ins("shl.b64", "%o", "%o", "1", pred="!%isf32")
        ins("add.u64", "%a", "%rowp", "%o")
        ins("setp.eq.u32", "%q", "%nv", "8")
        ins("and.pred", "%q", "%q", "%vecok")
        emit(f"    @!%q bra        {lab}_SCALAR;")
        emit(f"    @%isf32 ld.global.v4.f32 {{{xs[0]}, {xs[1]}, {xs[2]}, {xs[3]}}}, [%a];")
        emit(f"    @%isf32 ld.global.v4.f32 {{{xs[4]}, {xs[5]}, {xs[6]}, {xs[7]}}}, [%a+16];")
        emit(f"    @%isf32 bra     {lab}_GOT;")
        load16(xs, "ld.global.v4.b32", lab)
        emit(f"    bra.uni         {lab}_GOT;")
        label(f"{lab}_SCALAR")
        # predicated scalar loads, issued together
        emit(f"    @!%isf32 bra    {lab}_S16;")
        for j in range(8):
            pj = r(f"lp{j}", "pred")
            ins("setp.gt.u32", pj, "%nv", str(j))
            ins("ld.global.f32", xs[j], f"[%a+{4 * j}]", pred=pj)
        emit(f"    bra.uni         {lab}_GOT;")
        label(f"{lab}_S16")
        hs = [r(f"hh{j}", "b16") for j in range(8)]
        for j in range(8):
            pj = r(f"lp{j}", "pred")
            ins("setp.gt.u32", pj, "%nv", str(j))
            ins("mov.b16", hs[j], "0")
            ins("ld.global.b16", hs[j], f"[%a+{2 * j}]", pred=pj)
        emit(f"    @%isf16 bra     {lab}_S16F;")
        for j in range(8):
            ins("cvt.u32.u16", "%t", hs[j])
            ins("shl.b32", "%t", "%t", "16")
            ins("mov.b32", xs[j], "%t")
        emit(f"    bra.uni         {lab}_GOT;")
        label(f"{lab}_S16F")
        for j in range(8):
            ins("cvt.f32.f16", xs[j], hs[j])
        label(f"{lab}_GOT")
        for j in range(8):
            s = 8 * b + j
            pv = r("pv", "pred")
            ins("setp.gt.u32", pv, "%nv", str(j))
            ins("setp.nan.f32", "%q", xs[j], xs[j])
            ins("and.pred", "%q", "%q", pv)
            ins("or.pred", "%nan", "%nan", "%q")
            ins("setp.eq.f32", "%q", xs[j], "0f7F800000")
            ins("and.pred", "%q", "%q", pv)
            ins("selp.u32", "%t", "1", "0", "%q")
            ins("add.u32", "%ninf", "%ninf", "%t")
            ins("max.f32", "%m", "%m", xs[j], pred=pv)
            kk = r("kk", "b32")
            fkey(kk, xs[j], "l")
            ins("mov.u32", K(s), kk, pred=pv)
            ins("add.u32", "%addr", "%e", str(j))
            ins("shl.b32", "%addr", "%addr", "2")
            ins("add.u32", "%addr", "%addr", "%sel")
            ins("st.shared.u32", "[%addr]", kk, pred=pv)
    label("V2_LOADED")
    ins("vote.sync.any.pred", "%nan", "%nan", "0xffffffff")
    ins("redux.sync.add.u32", "%ninf", "%ninf", "0xffffffff")
    fkey("%t", "%m", "m")
    ins("redux.sync.max.u32", "%t", "%t", "0xffffffff")
    fromkey("%m", "%t", "m")
    ins("bar.warp.sync", "0xffffffff")
    emit("    @%nan bra       V2_ROW_NAN;")
    ins("setp.eq.f32", "%q", "%m", "0fFF800000")
    emit("    @%q bra         V2_ROW_MASKED;")
    if grouped:
        grouped_section()
    else:
        topk_section()
    tail()


def kept_weights(best_is_inf, fin, write, tag, recheck=False):
    """The core's kept_softmax for lane j's pick (%myv; %v0 the best): the
    +inf limit (1 / count of +inf picks) when `best_is_inf` (a setp into
    %q) holds, else exp(v - v0) over the sequential sum of the k picks.
    `recheck` recomputes the +inf test before the select (v2's text)."""
    comment("softmax over the k kept logits (the +inf limit when the best is +inf)")
    ins(*best_is_inf)
    emit(f"    @!%q bra        {fin};")
    ins("setp.eq.f32", "%q", "%myv", "0f7F800000")
    ins("and.pred", "%q", "%q", "%lt_k")
    ins("selp.u32", "%t", "1", "0", "%q")
    ins("redux.sync.add.u32", "%t", "%t", "0xffffffff")
    ins("cvt.rn.f32.u32", "%y", "%t")
    ins("div.rn.f32", "%y", "0f3F800000", "%y")
    if recheck:
        ins("setp.eq.f32", "%q", "%myv", "0f7F800000")
    ins("selp.f32", "%w", "%y", "0f00000000", "%q")
    emit(f"    bra.uni         {write};")
    label(fin)
    ins("sub.rn.f32", "%y", "%myv", "%v0")
    cexp("%y", "%y", "p")
    seq_sum("%s", "%y", tag)
    ins("div.rn.f32", "%w", "%y", "%s")
    emit(f"    bra.uni         {write};")


def topk_section():

    comment("---------- modes 0 and 1: top-k of the logits ----------")
    select_rounds("P", True)
    fromkey("%myv", "%myk", "p")
    ins("shfl.sync.idx.b32", "%v0", "%myv", "0", "0x1f", "0xffffffff")
    ins("setp.eq.u32", "%q", "%mode", "1")
    emit("    @%q bra         V2_KEPT;")
    comment("mode 0: softmax over all E at the picks")
    ins("setp.eq.f32", "%q", "%v0", "0f7F800000")
    emit("    @!%q bra        V2_M0_FIN;")
    ins("cvt.rn.f32.u32", "%y", "%ninf")
    ins("div.rn.f32", "%y", "0f3F800000", "%y")
    ins("setp.eq.f32", "%q", "%myv", "0f7F800000")
    ins("selp.f32", "%w", "%y", "0f00000000", "%q")
    emit("    bra.uni         V2_WRITE;")
    label("V2_M0_FIN")
    warp_sum_exp("%sum", "%sel", "%v0", "M0")
    ins("sub.rn.f32", "%y", "%myv", "%v0")
    cexp("%y", "%y", "p")
    ins("div.rn.f32", "%w", "%y", "%sum")
    emit("    bra.uni         V2_WRITE;")
    label("V2_KEPT")
    kept_weights(("setp.eq.f32", "%q", "%v0", "0f7F800000"), "V2_KEPT_FIN", "V2_WRITE", "K", recheck=True)



def grouped_section():
    comment("---------- mode 2: grouped, biased routing ----------")
    ins("setp.ne.u32", "%sigm", "%scoring", "0")
    ins("setp.eq.f32", "%minf", "%m", "0f7F800000")
    ins("mov.f32", "%sum", "0f3F800000")
    ins("or.pred", "%q", "%sigm", "%minf")
    emit("    @%q bra         V2_G_SUMMED;")
    warp_sum_exp("%sum", "%sel", "%m", "G", 2)
    label("V2_G_SUMMED")
    # the sum read other lanes' logit keys, which the scores overwrite next
    ins("bar.warp.sync", "0xffffffff")
    ins("cvt.rn.f32.u32", "%y", "%ninf")
    ins("div.rn.f32", "%inv_inf", "0f3F800000", "%y")
    ins("setp.ne.u64", "%hasb", "%bias", "0")
    ins("cvta.to.global.u64", "%biasg", "%bias")
    comment("selection scores s + b into the register keys and shared memory;")
    comment("a non-finite bias makes a NaN row")
    ins("setp.ne.u32", "%nan", "0", "0")
    for b in range(BLOCKS):
        ins("add.u32", "%e", "%lane8", str(256 * b))
        ins("setp.ge.u32", "%q", "%e", "%E")
        emit(f"    @%q bra         V2_G_SCORED;")
        ins("sub.u32", "%nv", "%E", "%e")
        ins("min.u32", "%nv", "%nv", "8")
        ins("mul.wide.u32", "%o", "%e", "4")
        ins("add.u64", "%a", "%biasg", "%o")
        bs = []
        for j in range(8):
            pj = r(f"lp{j}", "pred")
            bv = r(f"bv{j}", "f32")
            ins("setp.gt.u32", pj, "%nv", str(j))
            ins("and.pred", pj, pj, "%hasb")
            ins("mov.f32", bv, "0f00000000")
            ins("ld.global.f32", bv, f"[%a+{4 * j}]", pred=pj)
            bs.append(bv)
        for j in range(8):
            s = 8 * b + j
            pv = r("pv", "pred")
            x = r(f"gx{j}", "f32")
            y = r(f"gy{j}", "f32")
            ins("setp.gt.u32", pv, "%nv", str(j))
            fromkey(x, K(s), f"g{j}")
            gscore(y, x, f"g{j}")
            ins("abs.f32", "%b2", bs[j])
            ins("setp.nan.f32", "%q", bs[j], bs[j])
            ins("or.pred", "%nan", "%nan", "%q")
            ins("setp.eq.f32", "%q", "%b2", "0f7F800000")
            ins("or.pred", "%nan", "%nan", "%q")
            ins("add.rn.f32", "%yb", y, bs[j], pred="%hasb")
            ins("mov.f32", "%yb", y, pred="!%hasb")
            kk = r("kk", "b32")
            fkey(kk, "%yb", "g")
            ins("mov.u32", K(s), kk, pred=pv)
            ins("add.u32", "%addr", "%e", str(j))
            ins("shl.b32", "%addr", "%addr", "2")
            ins("add.u32", "%addr", "%addr", "%sel")
            ins("st.shared.u32", "[%addr]", kk, pred=pv)
    label("V2_G_SCORED")
    ins("vote.sync.any.pred", "%nan", "%nan", "0xffffffff")
    ins("bar.warp.sync", "0xffffffff")
    emit("    @%nan bra       V2_ROW_NAN;")
    ins("setp.ge.u32", "%q", "%tkg", "%ng")
    emit("    @%q bra         V2_G_EXPERTS;")
    comment("group scores: top-2 sum (or max) of each group's selection scores;")
    comment("lane l scores groups l, l + 32, ...; two independent chains per")
    comment("group (top-2 of a multiset does not depend on the order)")
    ins("div.u32", "%size", "%E", "%ng")
    ins("mov.u32", "%g", "%lane")
    label("V2_G_SCORE")
    ins("setp.ge.u32", "%q", "%g", "%ng")
    emit("    @%q bra         V2_G_SCORES_DONE;")
    for c in "AB":
        ins("mov.f32", f"%{c}1", "0fFF800000")
        ins("mov.f32", f"%{c}2", "0fFF800000")
        r(f"{c}1", "f32")
        r(f"{c}2", "f32")
    ins("mul.lo.u32", "%e", "%g", "%size")
    ins("add.u32", "%u", "%e", "%size")
    label("V2_G_ELEM")
    ins("setp.ge.u32", "%q", "%e", "%u")
    emit("    @%q bra         V2_G_ELEM_DONE;")
    gx = []
    for i in range(8):
        pe = r(f"wsp{i}", "pred")
        a = r(f"wsa{i}", "b32")
        kk = r(f"wsk{i}", "b32")
        ins("add.u32", a, "%e", str(i))
        ins("setp.lt.u32", pe, a, "%u")
        ins("shl.b32", a, a, "2")
        ins("add.u32", a, a, "%sel")
        ins("mov.u32", kk, "0x007FFFFF")  # key of -inf: no effect on a top-2
        ins("ld.shared.u32", kk, f"[{a}]", pred=pe)
        gx.append(kk)
    for i, kk in enumerate(gx):
        c = "AB"[i % 2]
        x = r(f"wsx{i}", "f32")
        fromkey(x, kk, f"w{i}")
        b1, b2 = f"%{c}1", f"%{c}2"
        q = r(f"gq{c}", "pred")
        yy = r(f"gyy{c}", "f32")
        ins("setp.lt.f32", q, x, b1)
        ins("selp.f32", yy, x, b1, q)
        ins("setp.gt.f32", q, yy, b2)
        ins("selp.f32", b2, yy, b2, q)
        ins("setp.gt.f32", q, x, b1)
        ins("selp.f32", b1, x, b1, q)
    ins("add.u32", "%e", "%e", "8")
    emit("    bra.uni         V2_G_ELEM;")
    label("V2_G_ELEM_DONE")
    comment("merge the chains: b1 = max, b2 = the multiset's second largest")
    ins("max.f32", "%b1", "%A1", "%B1")
    ins("min.f32", "%bv", "%A1", "%B1")
    ins("max.f32", "%gv", "%A2", "%B2")
    ins("max.f32", "%b2", "%bv", "%gv")
    ins("setp.eq.u32", "%q", "%gsc", "0")
    ins("add.rn.f32", "%b1", "%b1", "%b2", pred="%q")
    ins("shl.b32", "%addr", "%g", "2")
    ins("add.u32", "%addr", "%addr", "%grp")
    fkey("%t", "%b1", "s")
    ins("st.shared.u32", "[%addr]", "%t")
    ins("add.u32", "%g", "%g", "32")
    emit("    bra.uni         V2_G_SCORE;")
    label("V2_G_SCORES_DONE")
    ins("bar.warp.sync", "0xffffffff")
    comment("the topk_group-th best group (gk, gi) is the cut: groups at or before")
    comment("it in the order (score desc, index asc) are kept. Group keys in")
    comment("registers (lane l: groups l + 32 i), popped like the experts.")
    for i in range(8):
        gq = r(f"G{i}", "b32")
        ins("add.u32", "%g", "%lane", str(32 * i))
        ins("setp.lt.u32", "%q", "%g", "%ng")
        ins("shl.b32", "%addr", "%g", "2")
        ins("add.u32", "%addr", "%addr", "%grp")
        ins("mov.u32", gq, "0")
        ins("ld.shared.u32", gq, "[%addr]", pred="%q")
    ins("mov.u32", "%j", "0")
    label("V2_G_ROUND")
    ins("setp.ge.u32", "%q", "%j", "%tkg")
    emit("    @%q bra         V2_G_CUT;")
    groups = [[f"%G{i}" for i in range(8)]]
    lane_best(groups, None)
    ins("redux.sync.max.u32", "%gk", "%bk", "0xffffffff")
    ins("shl.b32", "%t", "%bs", "5")
    ins("add.u32", "%t", "%t", "%lane")
    ins("setp.eq.u32", "%q", "%bk", "%gk")
    ins("selp.b32", "%t", "%t", "0xFFFFFFFF", "%q")
    ins("redux.sync.min.u32", "%gi", "%t", "0xffffffff")
    ins("setp.eq.u32", "%qw", "%t", "%gi")
    pop_winner(groups, None)
    ins("add.u32", "%j", "%j", "1")
    emit("    bra.uni         V2_G_ROUND;")
    label("V2_G_CUT")
    comment("mask the experts of the other groups (-inf keys): group of the")
    comment("lane's first slot by one division, the rest by counting")
    for b in range(BLOCKS):
        ins("add.u32", "%e", "%lane8", str(256 * b))
        ins("setp.ge.u32", "%q", "%e", "%E")
        emit("    @%q bra         V2_G_MASKED;")
        ins("div.u32", "%g", "%e", "%size")
        ins("mul.lo.u32", "%t", "%g", "%size")
        ins("sub.u32", "%u", "%e", "%t")  # position inside the group
        gk8 = []
        for j in range(8):
            if j > 0:
                ins("add.u32", "%u", "%u", "1")
                ins("setp.eq.u32", "%q", "%u", "%size")
                ins("selp.b32", "%u", "0", "%u", "%q")
                ins("selp.b32", "%t", "1", "0", "%q")
                ins("add.u32", "%g", "%g", "%t")
            gg = r(f"gg{j}", "b32")
            ins("mov.u32", gg, "%g")
            gk8.append(gg)
        kg = []
        for j in range(8):
            a = r(f"wsa{j}", "b32")
            kk = r(f"wsk{j}", "b32")
            ins("min.u32", a, gk8[j], "255")
            ins("shl.b32", a, a, "2")
            ins("add.u32", a, a, "%grp")
            ins("ld.shared.u32", kk, f"[{a}]")
            kg.append(kk)
        for j in range(8):
            s = 8 * b + j
            q, q2 = "%q", "%q2"
            ins("setp.gt.u32", q, kg[j], "%gk")
            ins("setp.eq.u32", q2, kg[j], "%gk")
            ins("setp.le.and.u32", q2, gk8[j], "%gi", q2)
            ins("or.pred", q, q, q2)
            # dropped and a real slot (key != 0): the key of -inf
            ins("setp.ne.and.u32", q2, K(s), "0", "!%q")
            ins("mov.u32", K(s), "0x007FFFFF", pred=q2)
    label("V2_G_MASKED")
    ins("bar.warp.sync", "0xffffffff")
    label("V2_G_EXPERTS")
    select_rounds("G", False)
    comment("weights from the unbiased scores of the picks")
    ins("mov.f32", "%w", "0f00000000")
    emit("    @!%lt_k bra     V2_G_RENORM;")
    # load_logit(rowp, myi)
    emit("    @%isf32 bra     V2_G_LF32;")
    ins("mul.wide.u32", "%o", "%myi", "2")
    ins("add.u64", "%a", "%rowp", "%o")
    ins("ld.global.b16", "%h0", "[%a]")
    emit("    @%isf16 bra     V2_G_LF16;")
    ins("cvt.u32.u16", "%t", "%h0")
    ins("shl.b32", "%t", "%t", "16")
    ins("mov.b32", "%x", "%t")
    emit("    bra.uni         V2_G_LGOT;")
    label("V2_G_LF16")
    ins("cvt.f32.f16", "%x", "%h0")
    emit("    bra.uni         V2_G_LGOT;")
    label("V2_G_LF32")
    ins("mul.wide.u32", "%o", "%myi", "4")
    ins("add.u64", "%a", "%rowp", "%o")
    ins("ld.global.f32", "%x", "[%a]")
    label("V2_G_LGOT")
    gscore("%w", "%x", "w")
    label("V2_G_RENORM")
    ins("setp.eq.u32", "%q", "%renorm", "0")
    emit("    @%q bra         V2_G_SCALE;")
    seq_sum("%s", "%w", "G")
    ins("setp.gt.f32", "%q", "%s", "0f00000000")
    ins("div.rn.f32", "%w", "%w", "%s", pred="%q")
    label("V2_G_SCALE")
    ins("mul.rn.f32", "%w", "%w", "%scale")
    emit("    bra.uni         V2_WRITE;")



def tail(pre="V2"):
    """The NaN and masked rows' outputs, then the write of lane j < k's
    pick (labels prefixed `pre`: each entry has its own)."""
    label(f"{pre}_ROW_NAN")
    ins("mov.u32", "%myi", "%lane")
    ins("mov.f32", "%w", "0f7FFFFFFF")
    emit(f"    bra.uni         {pre}_WRITE;")
    label(f"{pre}_ROW_MASKED")
    ins("mov.u32", "%myi", "%lane")
    ins("mov.f32", "%w", "0f00000000")
    label(f"{pre}_WRITE")
    emit(f"    @!%lt_k bra     {pre}_EXIT;")
    ins("mad.lo.u32", "%t", "%row", "%k", "%lane")
    ins("mul.wide.u32", "%o", "%t", "4")
    ins("add.u64", "%a", "%ids", "%o")
    ins("st.global.u32", "[%a]", "%myi")
    ins("add.u64", "%a", "%wts", "%o")
    ins("st.global.f32", "[%a]", "%w")
    label(f"{pre}_EXIT")
    ins("ret")


# The grouped-routing parameters and the output pointers, shared by the
# v2 and grouped v3 prologues.
GROUP_PARAMS = """\
    ld.param.u32    %ng, [p+60];
    ld.param.u32    %tkg, [p+64];
    ld.param.u32    %gsc, [p+68];
    ld.param.u32    %renorm, [p+72];
    ld.param.f32    %scale, [p+76];
    cvta.to.global.u64 %logits, %logits;
    cvta.to.global.u64 %ids, %ids;
    cvta.to.global.u64 %wts, %wts;
"""


PROLOGUE = """\
    mov.u32         %th, %tid.x;
    shr.u32         %warp, %th, 5;
    mov.u32         %lane, %laneid;
    shl.b32         %lane8, %lane, 3;
    mov.u32         %t, %ctaid.x;
    mad.lo.u32      %row, %t, 8, %warp;
    ld.param.u32    %T, [p+32];
    setp.ge.u32     %q, %row, %T;
    @%q bra         V2_EXIT;
    ld.param.u64    %logits, [p+0];
    ld.param.u64    %ids, [p+8];
    ld.param.u64    %wts, [p+16];
    ld.param.u64    %bias, [p+24];
    ld.param.u32    %E, [p+36];
    ld.param.u32    %stride, [p+40];
    ld.param.u32    %k, [p+44];
    ld.param.u32    %dtype, [p+48];
    and.b32         %t, %dtype, 256;
    setp.ne.u32     %vecok, %t, 0;
    and.b32         %dtype, %dtype, 255;
    setp.eq.u32     %isf32, %dtype, 0;
    setp.eq.u32     %isf16, %dtype, 1;
    ld.param.u32    %mode, [p+52];
    ld.param.u32    %scoring, [p+56];
""" + GROUP_PARAMS + """\
    setp.lt.u32     %lt_k, %lane, %k;
    // this warp's shared memory: keys [E], then group scores [256]
    add.u32         %t, %E, 256;
    shl.b32         %t, %t, 2;
    mul.lo.u32      %t, %t, %warp;
    mov.u32         %sel, gsm;
    add.u32         %sel, %sel, %t;
    shl.b32         %t, %E, 2;
    add.u32         %grp, %sel, %t;
"""

FIXED = {
    "pred": "q q2 qw nan lt_k vecok isf32 isf16 sigm minf hasb",
    "b16": "h0 h1",
    "b32": "th warp lane lane8 row T E stride k dtype mode scoring ng tkg gsc renorm sel grp e addr t "
    "ninf j myk myi size g gk gi u nv bk bs rk ri",
    "b64": "logits ids wts bias biasg rowp a o",
    "f32": "scale x m y w s sum inv_inf b1 b2 bv gv myv v0 yb",
}


ENTRIES = (
    ("gate_topk_v2", False, "modes 0 and 1 (softmax then top-k; top-k then softmax)"),
    ("gate_grouped_v2", True, "mode 2 (grouped, biased routing)"),
)


# ------------------------------------------------------------ gate_topk_v3
# Batcher's odd-even merge sort of 8 (19 comparators), descending: slot 0
# ends up the lane's largest key. (Checked by the 0-1 principle in
# v3_self_check below, which `main` runs before writing.)
SORT8 = [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (1, 2), (5, 6),
         (0, 4), (1, 5), (2, 6), (3, 7), (2, 4), (3, 5), (1, 2), (3, 4), (5, 6)]


def v3_key(h):
    """The key gate_topk_v3 builds from a 16-bit float pattern h (its index
    part left 0): the f32 order key of h << 16, plus 1 so that -0 meets +0,
    low half cleared. Mirrors the PTX below; used by v3_self_check."""
    x = (h << 16) & 0xFFFFFFFF
    mask = (0xFFFFFFFF if x >> 31 else 0) | 0x80000000
    return (((x ^ mask) + 1) & 0xFFFFFFFF) & 0xFFFF0000


def v3_self_check():
    """Fails the generator (before anything is written) if the sort network
    does not sort or the key transform does not order bf16 and f16 values
    the way the core compares their f32 widenings (-0 == +0)."""
    import math
    import struct

    for bits in range(256):
        a = [(bits >> i) & 1 for i in range(8)]
        for i, j in SORT8:
            a[i], a[j] = max(a[i], a[j]), min(a[i], a[j])
        assert a == sorted(a, reverse=True), bits
    for name, f in (
        ("bf16", lambda h: struct.unpack(">f", struct.pack(">I", h << 16))[0]),
        ("f16", lambda h: struct.unpack(">e", struct.pack(">H", h))[0]),
    ):
        vals = sorted((h for h in range(65536) if not math.isnan(f(h))), key=f)
        for a, b in zip(vals, vals[1:]):
            assert (v3_key(a) < v3_key(b)) if f(a) < f(b) else (v3_key(a) == v3_key(b)), (name, a, b)
        inf, ninf = (0xFF80, 0x0080) if name == "bf16" else (0xFC00, 0x0400)
        for h in range(65536):
            k = v3_key(h) >> 16
            if math.isnan(f(h)):
                assert k > inf or k < ninf, (name, h)
            else:
                assert ninf <= k <= inf, (name, h)


def v3_body():
    comment("this lane's 8 logits (16-byte vector load; lanes past E hold none)")
    ins("shl.b32", "%e", "%lane", "3")
    ins("setp.lt.u32", "%hv", "%e", "%E")
    ins("mul.wide.u32", "%o", "%row", "%stride")
    ins("shl.b64", "%o", "%o", "1")
    ins("add.u64", "%rowp", "%logits", "%o")
    ins("mul.wide.u32", "%o", "%e", "2")
    ins("add.u64", "%a", "%rowp", "%o")
    for s in range(8):
        ins("mov.u32", K(s), "0")
    emit("    @!%hv bra       V3_KEYED;")
    ws = [r(f"w{i}", "b32") for i in range(4)]
    emit(f"    ld.global.nc.v4.b32 {{{ws[0]}, {ws[1]}, {ws[2]}, {ws[3]}}}, [%a];")
    comment("key = (order key of the value as f32) + 1, high half; low half 0xFFFF - index")
    ins("sub.u32", "%ib", "65535", "%e")
    for j in range(8):
        x = r("x", "b32")
        if j % 2 == 0:
            ins("shl.b32", x, ws[j // 2], "16")
        else:
            ins("and.b32", x, ws[j // 2], "0xFFFF0000")
        ins("shr.s32", "%t", x, "31")
        ins("or.b32", "%t", "%t", "0x80000000")
        ins("xor.b32", x, x, "%t")
        ins("add.u32", x, x, "1")
        ins("and.b32", x, x, "0xFFFF0000")
        ins("sub.u32", "%t", "%ib", str(j))
        ins("or.b32", K(j), x, "%t")
    comment("sorted descending (Batcher's network of 8)")
    for i, j in SORT8:
        ins("max.u32", "%t", K(i), K(j))
        ins("min.u32", K(j), K(i), K(j))
        ins("mov.u32", K(i), "%t")
    label("V3_KEYED")
    comment("the row's smallest key (NaN check); lanes without logits do not count")
    ins("selp.b32", "%t", K(7), "0xFFFFFFFF", "%hv")
    ins("redux.sync.min.u32", "%rmin", "%t", "0xffffffff")
    comment("k rounds: the warp's largest head wins (keys are unique), its lane pops it")
    ins("mov.u32", "%myk", "0")  # lanes >= k get no pick (their values are never used)
    for rd in range(32):
        if rd > 0:
            ins("setp.le.u32", "%q", "%k", str(rd))
            emit("    @%q bra         V3_PICKED;")
        ins("redux.sync.max.u32", "%rk", K(0), "0xffffffff")
        if rd == 0:
            ins("mov.u32", "%rk0", "%rk")
        ins("setp.eq.u32", "%qw", K(0), "%rk")
        for s in range(7):
            ins("mov.u32", K(s), K(s + 1), pred="%qw")
        ins("mov.u32", K(7), "0", pred="%qw")
        ins("setp.eq.u32", "%q", "%lane", str(rd))
        ins("mov.u32", "%myk", "%rk", pred="%q")
    label("V3_PICKED")
    comment("NaN anywhere: above +inf's key or below -inf's (%kinf, %kninf per dtype)")
    ins("shr.u32", "%t", "%rk0", "16")
    ins("setp.gt.u32", "%q", "%t", "%kinf")
    ins("shr.u32", "%u", "%rmin", "16")
    ins("setp.lt.u32", "%q2", "%u", "%kninf")
    ins("or.pred", "%q", "%q", "%q2")
    emit("    @%q bra         V3_ROW_NAN;")
    ins("setp.eq.u32", "%q", "%t", "%kninf")
    emit("    @%q bra         V3_ROW_MASKED;")
    comment("this lane's pick: index and value")
    ins("and.b32", "%myi", "%myk", "0xFFFF")
    ins("sub.u32", "%myi", "65535", "%myi")
    ins("shr.u32", "%u", "%myk", "16")
    ins("setp.lt.u32", "%q", "%u", "32768")
    ins("sub.u32", "%u", "%u", "1", pred="%q")
    ins("not.b32", "%u", "%u", pred="%q")
    ins("xor.b32", "%u", "%u", "0x8000", pred="!%q")
    ins("and.b32", "%u", "%u", "0xFFFF")
    emit("    @%isf16 bra     V3_F16;")
    ins("shl.b32", "%u", "%u", "16")
    ins("mov.b32", "%myv", "%u")
    emit("    bra.uni         V3_VALUED;")
    label("V3_F16")
    ins("cvt.u16.u32", "%h0", "%u")
    ins("cvt.f32.f16", "%myv", "%h0")
    label("V3_VALUED")
    ins("shfl.sync.idx.b32", "%v0", "%myv", "0", "0x1f", "0xffffffff")
    kept_weights(("setp.eq.u32", "%q", "%t", "%kinf"), "V3_FIN", "V3_WRITE", "K3")
    tail("V3")


def warp_row_prologue(pre):
    """The v3 kernels' first lines: this warp's token row (8 warps a block),
    an exit past T, the three pointers every kernel takes."""
    return f"""\
    mov.u32         %th, %tid.x;
    shr.u32         %warp, %th, 5;
    mov.u32         %lane, %laneid;
    mov.u32         %t, %ctaid.x;
    mad.lo.u32      %row, %t, 8, %warp;
    ld.param.u32    %T, [p+32];
    setp.ge.u32     %q, %row, %T;
    @%q bra         {pre}_EXIT;
    ld.param.u64    %logits, [p+0];
    ld.param.u64    %ids, [p+8];
    ld.param.u64    %wts, [p+16];
"""


V3_PROLOGUE = warp_row_prologue("V3") + """\
    ld.param.u32    %E, [p+36];
    ld.param.u32    %stride, [p+40];
    ld.param.u32    %k, [p+44];
    ld.param.u32    %dtype, [p+48];
    and.b32         %dtype, %dtype, 255;
    setp.eq.u32     %isf16, %dtype, 1;
    selp.b32        %kinf, 0xFC00, 0xFF80, %isf16;
    selp.b32        %kninf, 0x0400, 0x0080, %isf16;
    cvta.to.global.u64 %logits, %logits;
    cvta.to.global.u64 %ids, %ids;
    cvta.to.global.u64 %wts, %wts;
    setp.lt.u32     %lt_k, %lane, %k;
"""

V3_FIXED = {
    "pred": "q q2 qw lt_k isf16 hv",
    "b16": "h0",
    "b32": "th warp lane row T E stride k dtype kinf kninf e ib t u rk rk0 rmin myk myi",
    "b64": "logits ids wts rowp a o",
    "f32": "myv v0 y w s",
}


V3_HEAD = [
    "gate_topk_v3: mode 1 (top-k, then softmax over the kept logits:",
    "renormalized topk_softmax and keep_topk_softmax) for 16-bit logits",
    "(f16, bf16) with E <= 256, E % 8 == 0 and 16-byte aligned rows (the",
    "launcher checks; the others run gate_topk_v2). Lane l holds elements",
    "8l..8l+7 as unique 32-bit keys: the high half is the f32 order key of",
    "the value plus one (so -0 and +0 meet: the core canonicalizes -0), the",
    "low half 0xFFFF - index (ties to the lower index). A lane sorts its 8",
    "keys once (19 compare-exchanges); a selection round is one",
    "redux.sync.max over the lanes' heads and a shift in the winning lane.",
    "NaN shows as a key above +inf's or below -inf's. Same parameter block,",
    "launch shape (one warp per token, 8 per block) and bits as gate_topk;",
    "no shared memory.",
]


# --------------------------------------------------------- gate_grouped_v3
def top2_merge(a1, a2, b1, b2, t):
    """(a1, a2) = the two largest of the multiset {a1, a2, b1, b2}, given
    a1 >= a2 and b1 >= b2 (finite values: max/min select exactly)."""
    lo, hi2 = r(f"t2l{t}", "f32"), r(f"t2h{t}", "f32")
    ins("min.f32", lo, a1, b1)
    ins("max.f32", hi2, a2, b2)
    ins("max.f32", a1, a1, b1)
    ins("max.f32", a2, lo, hi2)


def g3_body():
    comment("this lane's 8 experts 8l..8l+7 (lanes past E hold none)")
    ins("shl.b32", "%e", "%lane", "3")
    ins("setp.lt.u32", "%hv", "%e", "%E")
    ins("mul.wide.u32", "%o", "%row", "%stride")
    ins("cvt.u64.u32", "%oe", "%e")
    ins("shl.b64", "%o", "%o", "2", pred="%isf32")
    ins("shl.b64", "%oe", "%oe", "2", pred="%isf32")
    ins("shl.b64", "%o", "%o", "1", pred="!%isf32")
    ins("shl.b64", "%oe", "%oe", "1", pred="!%isf32")
    ins("add.u64", "%rowp", "%logits", "%o")
    ins("add.u64", "%a", "%rowp", "%oe")
    xs = [r(f"x{j}", "f32") for j in range(8)]
    bs = [r(f"b{j}", "f32") for j in range(8)]
    ss = [r(f"s{j}", "f32") for j in range(8)]
    for j in range(8):
        ins("mov.f32", xs[j], "0fFF800000")
        ins("mov.f32", bs[j], "0f00000000")
    emit("    @!%hv bra       G3_GOT;")
    comment("the bias first (independent of the logits; 16-byte aligned, the launcher checks)")
    ins("mul.wide.u32", "%o", "%e", "4")
    ins("add.u64", "%ba", "%biasg", "%o")
    emit(f"    @%hasb ld.global.nc.v4.f32 {{{bs[0]}, {bs[1]}, {bs[2]}, {bs[3]}}}, [%ba];")
    emit(f"    @%hasb ld.global.nc.v4.f32 {{{bs[4]}, {bs[5]}, {bs[6]}, {bs[7]}}}, [%ba+16];")
    emit("    @!%isf32 bra    G3_16;")
    emit(f"    ld.global.nc.v4.f32 {{{xs[0]}, {xs[1]}, {xs[2]}, {xs[3]}}}, [%a];")
    emit(f"    ld.global.nc.v4.f32 {{{xs[4]}, {xs[5]}, {xs[6]}, {xs[7]}}}, [%a+16];")
    emit("    bra.uni         G3_GOT;")
    label("G3_16")
    load16(xs, "ld.global.nc.v4.b32", "G3")
    label("G3_GOT")
    comment("NaN anywhere (a non-finite bias too, as gate_grouped_v2), all -inf (masked)")
    ins("setp.ne.u32", "%nan", "0", "0")
    ins("setp.ne.u32", "%bnan", "0", "0")
    ins("setp.ne.u32", "%live", "0", "0")
    for j in range(8):
        ins("setp.nan.f32", "%q", xs[j], xs[j])
        ins("or.pred", "%nan", "%nan", "%q")
        ins("setp.neu.f32", "%q", xs[j], "0fFF800000")
        ins("or.pred", "%live", "%live", "%q")
        ins("abs.f32", "%y", bs[j])
        ins("setp.equ.f32", "%q", "%y", "0f7F800000")
        ins("or.pred", "%bnan", "%bnan", "%q")
    ins("vote.sync.any.pred", "%nan", "%nan", "0xffffffff")
    ins("vote.sync.any.pred", "%live", "%live", "0xffffffff")
    ins("vote.sync.any.pred", "%bnan", "%bnan", "0xffffffff")
    emit("    @%nan bra       G3_ROW_NAN;")
    emit("    @!%live bra     G3_ROW_MASKED;")
    emit("    @%bnan bra      G3_ROW_NAN;")
    comment("scores s = 1 / (1 + exp(-x)) (the core's exp), selection scores s + b")
    sel = [r(f"v{j}", "f32") for j in range(8)]
    for j in range(8):
        ins("neg.f32", ss[j], xs[j])
    for j in range(8):
        cexp(ss[j], ss[j], f"g{j}")
    for j in range(8):
        ins("add.rn.f32", ss[j], ss[j], "0f3F800000")
        ins("div.rn.f32", ss[j], "0f3F800000", ss[j])
    for j in range(8):
        ins("add.rn.f32", sel[j], ss[j], bs[j], pred="%hasb")
        ins("mov.f32", sel[j], ss[j], pred="!%hasb")
    comment("every selection score is finite and not -0: max/min select exactly")
    ins("setp.ge.u32", "%q", "%tkg", "%ng")
    emit("    @%q bra         G3_KEYS;")
    comment("group scores: the lane's top-2 of 8, then over the group's L lanes (xor butterfly)")
    h = [r(f"th{i}", "f32") for i in range(4)]
    l = [r(f"tl{i}", "f32") for i in range(4)]
    for i in range(4):
        ins("max.f32", h[i], sel[2 * i], sel[2 * i + 1])
        ins("min.f32", l[i], sel[2 * i], sel[2 * i + 1])
    top2_merge(h[0], l[0], h[1], l[1], "a")
    top2_merge(h[2], l[2], h[3], l[3], "b")
    top2_merge(h[0], l[0], h[2], l[2], "a")
    o1, o2 = r("o1", "f32"), r("o2", "f32")
    for d in (1, 2, 4, 8, 16):
        ins("setp.ge.u32", "%q", str(d), "%L")
        emit("    @%q bra         G3_GSCORED;")
        ins("shfl.sync.bfly.b32", o1, h[0], str(d), "0x1f", "0xffffffff")
        ins("shfl.sync.bfly.b32", o2, l[0], str(d), "0x1f", "0xffffffff")
        top2_merge(h[0], l[0], o1, o2, "a")
    label("G3_GSCORED")
    ins("setp.eq.u32", "%q", "%gsc", "0")
    ins("add.rn.f32", h[0], h[0], l[0], pred="%q")
    comment("the group's rank in (score desc, index asc); kept when below topk_group")
    ins("div.u32", "%g", "%lane", "%L")
    ins("mov.u32", "%rank", "0")
    ins("mov.u32", "%src", "0")
    for c in range(4):
        gv = []
        for i in range(8):
            hh = 8 * c + i
            if i == 0 and c > 0:
                ins("setp.le.u32", "%q", "%ng", str(hh))
                emit("    @%q bra         G3_RANKED;")
            v = r(f"gv{i}", "f32")
            ins("shfl.sync.idx.b32", v, h[0], "%src", "0x1f", "0xffffffff")
            ins("add.u32", "%src", "%src", "%L")
            gv.append((hh, v))
        for hh, v in gv:
            ins("setp.eq.f32", "%q", v, h[0])
            ins("setp.gt.and.u32", "%q", "%g", str(hh), "%q")
            ins("setp.gt.or.f32", "%q", v, h[0], "%q")
            ins("setp.gt.and.u32", "%q", "%ng", str(hh), "%q")
            ins("selp.u32", "%t", "1", "0", "%q")
            ins("add.u32", "%rank", "%rank", "%t")
    label("G3_RANKED")
    ins("setp.ge.u32", "%drop", "%rank", "%tkg")
    emit("    bra.uni         G3_KEYED;")
    label("G3_KEYS")
    ins("setp.ne.u32", "%drop", "0", "0")
    label("G3_KEYED")
    comment("keys: hi = order key of s + b (0 for dropped groups and lanes past E),")
    comment("lo = 7 - slot; sorted descending by (hi, lo), so ties go to the lower index")
    hi = [r(f"kh{j}", "b32") for j in range(8)]
    lo = [r(f"kl{j}", "b32") for j in range(8)]
    ins("or.pred", "%drop", "%drop", "!%hv")
    for j in range(8):
        ins("mov.b32", "%t", sel[j])
        ins("shr.s32", "%u", "%t", "31")
        ins("or.b32", "%u", "%u", "0x80000000")
        ins("xor.b32", hi[j], "%t", "%u")
        ins("selp.b32", hi[j], "0", hi[j], "%drop")
        ins("mov.u32", lo[j], str(7 - j))
    for i, j in SORT8:
        ins("setp.eq.u32", "%q", hi[j], hi[i])
        ins("setp.gt.and.u32", "%q", lo[j], lo[i], "%q")
        ins("setp.gt.or.u32", "%q", hi[j], hi[i], "%q")
        ins("selp.b32", "%t", hi[j], hi[i], "%q")
        ins("selp.b32", hi[j], hi[i], hi[j], "%q")
        ins("mov.u32", hi[i], "%t")
        ins("selp.b32", "%t", lo[j], lo[i], "%q")
        ins("selp.b32", lo[j], lo[i], lo[j], "%q")
        ins("mov.u32", lo[i], "%t")
    comment("k rounds: the largest head value, then the lowest index holding it")
    ins("mov.u32", "%myi", "0")
    ins("add.u32", "%ib", "%e", "7")
    for rd in range(32):
        if rd > 0:
            ins("setp.le.u32", "%q", "%k", str(rd))
            emit("    @%q bra         G3_PICKED;")
        ins("redux.sync.max.u32", "%rk", hi[0], "0xffffffff")
        ins("sub.u32", "%t", "%ib", lo[0])
        ins("setp.eq.u32", "%q", hi[0], "%rk")
        ins("selp.b32", "%t", "%t", "0xFFFFFFFF", "%q")
        ins("redux.sync.min.u32", "%ri", "%t", "0xffffffff")
        ins("setp.eq.u32", "%qw", "%t", "%ri")
        for s_ in range(7):
            ins("mov.u32", hi[s_], hi[s_ + 1], pred="%qw")
            ins("mov.u32", lo[s_], lo[s_ + 1], pred="%qw")
        ins("mov.u32", hi[7], "0", pred="%qw")
        ins("setp.eq.u32", "%q", "%lane", str(rd))
        ins("mov.u32", "%myi", "%ri", pred="%q")
    label("G3_PICKED")
    comment("lane j < k: the unbiased score of its pick, from the lane holding it")
    ins("shr.u32", "%src", "%myi", "3")
    ins("and.b32", "%u", "%myi", "7")
    gw = []
    for j in range(8):
        v = r(f"gv{j}", "f32")
        ins("shfl.sync.idx.b32", v, ss[j], "%src", "0x1f", "0xffffffff")
        gw.append(v)
    ins("mov.f32", "%w", gw[0])
    for j in range(1, 8):
        ins("setp.eq.u32", "%q", "%u", str(j))
        ins("selp.f32", "%w", gw[j], "%w", "%q")
    ins("setp.eq.u32", "%q", "%renorm", "0")
    emit("    @%q bra         G3_SCALE;")
    seq_sum("%s", "%w", "G3")
    ins("setp.gt.f32", "%q", "%s", "0f00000000")
    ins("div.rn.f32", "%w", "%w", "%s", pred="%q")
    label("G3_SCALE")
    ins("mul.rn.f32", "%w", "%w", "%scale")
    emit("    bra.uni         G3_WRITE;")
    tail("G3")


G3_PROLOGUE = warp_row_prologue("G3") + """\
    ld.param.u64    %bias, [p+24];
    ld.param.u32    %E, [p+36];
    ld.param.u32    %stride, [p+40];
    ld.param.u32    %k, [p+44];
    ld.param.u32    %dtype, [p+48];
    and.b32         %dtype, %dtype, 255;
    setp.eq.u32     %isf16, %dtype, 1;
    setp.eq.u32     %isf32, %dtype, 0;
""" + GROUP_PARAMS + """\
    setp.ne.u64     %hasb, %bias, 0;
    cvta.to.global.u64 %biasg, %bias;
    setp.lt.u32     %lt_k, %lane, %k;
    // lanes per group: E / n_group / 8 (a power of two when groups are used)
    div.u32         %L, %E, %ng;
    shr.u32         %L, %L, 3;
"""

G3_FIXED = {
    "pred": "q qw lt_k isf16 isf32 hv hasb nan bnan live drop",
    "b16": "h0 h1",
    "b32": "th warp lane row T E stride k dtype ng tkg gsc renorm L e g rank src ib t u rk ri myi",
    "b64": "logits ids wts bias biasg rowp a ba o oe",
    "f32": "scale w s y",
}


def declarations():
    """The .reg lines of every register `r` declared, by type, 12 a line."""
    by_ty = {}
    for n, ty in regs.items():
        by_ty.setdefault(ty, []).append("%" + n)
    decl = []
    for ty in ("pred", "b16", "b32", "b64", "f32"):
        names = by_ty.get(ty, [])
        for i in range(0, len(names), 12):
            decl.append(f"    .reg .{ty:<5} " + ", ".join(names[i : i + 12]) + ";")
    return decl


def entry_small(name, body, fixed, prologue, head, maxnreg):
    out.clear()
    regs.clear()
    for ty, names in fixed.items():
        for n in names.split():
            r(n, ty)
    body()
    code = out[:]
    decl = declarations()
    nreg = f" .maxnreg {maxnreg}" if maxnreg else ""
    text = [
        *("// " + ln if ln else "//" for ln in head),
        f".visible .entry {name}(.param .align 8 .b8 p[80]){nreg}",
        "{",
        *decl,
        "",
        prologue.rstrip("\n"),
        *code,
        "}",
    ]
    return "\n".join(text) + "\n"


G3_HEAD = [
    "gate_grouped_v3: mode 2 (grouped, biased routing) with sigmoid scores",
    "over f32, f16 or bf16 logits, E <= 256, E % 8 == 0, 16-byte aligned",
    "rows and bias, and groups of whole lanes (E / n_group a multiple of 8",
    "whose eighth is a power of two), or no group limiting (topk_group ==",
    "n_group); the launcher checks, the others run gate_grouped_v2. Lane l",
    "holds experts 8l..8l+7 in registers: their 8 sigmoids issue together,",
    "a group's top-2 is the lane's top-2 then an xor butterfly over the",
    "group's lanes, a group's rank is counted from one shuffle per group, and",
    "the top-k is picked from per-lane lists sorted once by (score key, index)",
    "with two redux.sync per pick; the weights are the picks' unbiased scores",
    "shuffled from the lanes holding them (no reload). Same parameter block,",
    "launch shape (one warp per token, 8 per block) and bits as gate_topk;",
    "no shared memory.",
]


def generate():
    v3_self_check()
    return "\n".join([
        *(entry(*e) for e in ENTRIES),
        entry_small("gate_topk_v3", v3_body, V3_FIXED, V3_PROLOGUE, V3_HEAD, 40),
        entry_small("gate_grouped_v3", g3_body, G3_FIXED, G3_PROLOGUE, G3_HEAD, 0),
    ])


def entry(name, grouped, what):
    out.clear()
    regs.clear()
    gscore.n = 0
    for ty, names in FIXED.items():
        for n in names.split():
            r(n, ty)
    body(grouped)
    code = out[:]
    decl = declarations()
    text = [
        f"// {name}: the tuned gating kernel for {what}; see the",
        "// generator's docstring for what differs from gate_topk. Same parameter",
        "// block, launch shape (one warp per token, 8 per block), dynamic shared",
        "// memory (8 * (E + 256) * 4 bytes) and bit-exact results; E <= %d." % MAXE,
        f".visible .entry {name}(.param .align 8 .b8 p[80])" + (" .maxnreg 40" if not grouped else ""),
        "{",
        *decl,
        "",
        PROLOGUE.rstrip("\n"),
        *code,
        "}",
    ]
    return "\n".join(text) + "\n"


HEADER = """\
// gating_v2.ptx: GENERATED by ptx/gen/gating_v2.py (do not edit; rerun it).
// The tuned top-k gating kernels: gate_topk_v2 (modes 0 and 1: softmax then
// top-k; top-k then softmax) and gate_grouped_v2 (mode 2: DeepSeek-V3
// grouped, biased routing), for E <= %d. Same parameter block (80 bytes,
// cuda/src/gating.rs), launch shape and bit-exact contract as gate_topk in
// ptx/gating.ptx, the on-device reference; see that file's header for the
// parameter offsets, the NaN and fully masked rows. What differs: each
// lane's keys stay in registers and the code is unrolled (the generator's
// docstring says how).
//
// Launch: one warp per token, 8 warps (256 threads) per block, grid =
// ceil(T / 8). Dynamic shared memory: 8 * (E + 256) * 4 bytes.
//
// Tested by cuda/tests/moe.rs, gating_matches_the_core_bit_for_bit: through
// gating::gate_with with GateKernel::V2 (Kernel::GateTopkV2 and
// Kernel::GateGroupedV2) on every random case with E <= 512, ids and
// weights bit for bit against medley_core::moe::gating.
//
// Self-contained: no .func calls; the only symbol is the dynamic shared
// memory gsm, declared here.
//
// .version 7.0 / .target sm_80: redux.sync needs sm_80.

.version 7.0
.target sm_80
.address_size 64

.extern .shared .align 16 .b8 gsm[];

""" % MAXE

PATH = "ptx/gating_v2.ptx"


def main():
    text = HEADER + generate()
    full = os.path.join(ROOT, PATH)
    if "--write" in sys.argv:
        with open(full, "w", newline="\n") as f:
            f.write(text)
        return
    try:
        with open(full, newline="") as f:
            cur = f.read()
    except FileNotFoundError:
        cur = None
    if cur != text:
        print("stale (run ptx/gen/gating_v2.py --write):", PATH)
        sys.exit(1)


if __name__ == "__main__":
    main()
