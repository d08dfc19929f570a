#!/usr/bin/env python3
"""Generates the block-wide reductions of ensemble_v2, ensemble_v2u and
ensemble_v2s in ptx/ensemble.ptx: red_all, red_all_ul and red_all_u, and
the lean red_lin and red_lin_u (linear pass 2 without a renormalization,
where every (max, sum, T) is (-inf, 0, 0): the same stage without the
maximum, its rebase and those sums, so the remaining fields keep their
bits).

One warp stage, emitted per field set: the maximum and the argmax value by
redux.sync on order-preserving keys (NaN as -inf, -0 as +0), the argmax index
by redux.sync.min over the lanes holding that value, the flag by
redux.sync.or, each partial's sum (and T) rebased to the maximum once, then
the sums by a butterfly; warp 0 runs the stage again over the 8 warp
partials. The functions share the instructions of their common fields,
so max, sum and argmax are bit-identical whichever one runs.
Usage: python3 ptx/gen/ensemble_red/gen.py [--write]: with --write it rewrites
the functions in ptx/ensemble.ptx (run ptx/check.sh after); without, it
checks that the file is current (CI).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PTX = os.path.join(HERE, '..', '..', 'ensemble.ptx')

def key(dst, src_bits, tmp):
    # order-preserving s32 key of a float's bits (an involution: decodes too)
    return [f"    shr.s32         {tmp}, {src_bits}, 31;",
            f"    and.b32         {tmp}, {tmp}, 0x7FFFFFFF;",
            f"    xor.b32         {dst}, {src_bits}, {tmp};"]

def warp_stage(T, H, A2, steps, lab, lin=False):
    L = []
    if not lin:
        L += max_stage(T, lab)
    L += arg_stage(A2)
    if lin and not H:
        return L
    L.append("    // the sums by a butterfly (every lane ends with the same bits)")
    for off in steps:
        if not lin: L.append(f"    shfl.sync.bfly.b32 %os, rs, {off}, 0x1f, 0xffffffff;")
        if T and not lin: L.append(f"    shfl.sync.bfly.b32 %ot, rt, {off}, 0x1f, 0xffffffff;")
        if H: L.append(f"    shfl.sync.bfly.b32 %oh, rh, {off}, 0x1f, 0xffffffff;")
        if not lin: L.append("    add.f32         rs, rs, %os;")
        if T and not lin: L.append("    add.f32         rt, rt, %ot;")
        if H: L.append("    add.f32         rh, rh, %oh;")
    return L

def max_stage(T, lab):
    """The maximum and every partial's sum (and T) rebased to it."""
    L = []
    L.append(f"    // {lab}: the maximum by its order key (one redux.sync; NaN as -inf)")
    L.append("    setp.nan.f32    %q, rm, rm;")
    L.append("    @%q mov.f32     rm, 0fFF800000;")
    L += redux_max("%nm", "rm")
    L.append("    // every partial rebased to it (empty ones, e = 0 or NaN, give 0)")
    L.append("    sub.f32         %d1, rm, %nm;")
    L.append("    mul.f32         %e1, %d1, %k;")
    L.append("    ex2.approx.ftz.f32 %e1, %e1;")
    L.append("    setp.gt.f32     %q3, %e1, 0f00000000;")
    if T:
        L.append("    mul.f32         %d1, %d1, scale;")
        L.append("    fma.rn.f32      rt, %d1, rs, rt;")
        L.append("    mul.f32         rt, rt, %e1;")
        L.append("    @!%q3 mov.f32   rt, 0f00000000;")
    L.append("    mul.f32         rs, rs, %e1;")
    L.append("    @!%q3 mov.f32   rs, 0f00000000;")
    L.append("    mov.f32         rm, %nm;")
    return L

def arg_stage(A2):
    """The argmax (value, lowest index), the second largest and the flag."""
    L = []
    L.append("    // the argmax: largest value key, then the lowest index holding it")
    L.append("    // (NaN as -inf, -0 as +0: value ties go to the lower index as before)")
    L.append("    setp.nan.f32    %q, rv, rv;")
    L.append("    @%q mov.f32     rv, 0fFF800000;")
    L.append("    add.f32         rv, rv, 0f00000000;")
    L.append("    mov.b32         %b1, rv;")
    L += key("%b1", "%b1", "%b2")
    L.append("    redux.sync.max.s32 %b3, %b1, 0xffffffff;")
    L.append("    setp.eq.s32     %q, %b1, %b3;")
    L.append("    selp.b32        %b4, ri, 0xFFFFFFFF, %q;")
    L.append("    redux.sync.min.u32 %b4, %b4, 0xffffffff;")
    if A2:
        L.append("    // second largest: every lane's a2, and its value unless it is the winner")
        L.append("    setp.eq.u32     %q2, ri, %b4;")
        L.append("    and.pred        %q2, %q2, %q;")
        L.append("    max.f32         %o2, r2, rv;")
        L.append("    @%q2 mov.f32    %o2, r2;")
        L += redux_max("r2", "%o2")
    L += key("%b3", "%b3", "%b2")
    L.append("    mov.b32         rv, %b3;")
    L.append("    mov.u32         ri, %b4;")
    L.append("    redux.sync.or.b32 rf, rf, 0xffffffff;")
    return L

def store_tuple(u):
    """The tuple (32 bytes: m s v i, then t h f a2) to shared memory at %t."""
    L = ["    mov.b32         %b3, rm;", "    mov.b32         %b4, rs;", "    mov.b32         %b2, rv;",
         "    st.shared.v4.b32 [%t], {%b3, %b4, %b2, ri};"]
    if u:
        L += ["    mov.b32         %b3, rt;", "    mov.b32         %b4, rh;", "    mov.b32         %b2, r2;",
              "    st.shared.v4.b32 [%t+16], {%b3, %b4, rf, %b2};"]
    else:
        L.append("    st.shared.u32   [%t+16], rf;")
    return L


def load_tuple(u):
    """The tuple back from shared memory at %t (store_tuple's layout)."""
    L = ["    ld.shared.v4.b32 {%b3, %b4, %b2, ri}, [%t];",
         "    mov.b32         rm, %b3;", "    mov.b32         rs, %b4;", "    mov.b32         rv, %b2;"]
    if u:
        L += ["    ld.shared.v4.b32 {%b3, %b4, rf, %b2}, [%t+16];",
              "    mov.b32         rt, %b3;", "    mov.b32         rh, %b4;", "    mov.b32         r2, %b2;"]
    else:
        L.append("    ld.shared.u32   rf, [%t+16];")
    return L


def redux_max(dst, src):
    """dst = the warp's maximum of float src (by its order key; no NaN)."""
    return (["    mov.b32         %b1, " + src + ";"] + key("%b1", "%b1", "%b2")
            + ["    redux.sync.max.s32 %b1, %b1, 0xffffffff;"] + key("%b1", "%b1", "%b2")
            + ["    mov.b32         " + dst + ", %b1;"])


def func(name, T, H, A2, doc, lin=False):
    u = T or H or A2
    P = ("RL" if lin else "RA") + name[7:].upper()
    L = doc
    if u:
        L.append(f".func (.reg .f32 rm, .reg .f32 rs, .reg .f32 rv, .reg .u32 ri, .reg .u32 rf, .reg .f32 rt, .reg .f32 rh, .reg .f32 r2)")
        L.append(f"      {name}(.reg .f32 m, .reg .f32 s, .reg .f32 v, .reg .u32 i, .reg .u32 f, .reg .f32 scale,")
        L.append(f"                .reg .f32 t, .reg .f32 h, .reg .f32 a2)")
    else:
        L.append(f".func (.reg .f32 rm, .reg .f32 rs, .reg .f32 rv, .reg .u32 ri, .reg .u32 rf)")
        L.append(f"      {name}(.reg .f32 m, .reg .f32 s, .reg .f32 v, .reg .u32 i, .reg .u32 f, .reg .f32 scale)")
    L.append("{")
    L.append("    .reg .pred  %q, %q2, %q3;")
    L.append("    .reg .b32   %lane, %warp, %t, %b1, %b2, %b3, %b4;")
    if lin:
        L.append("    .reg .f32   %os;")
        if u: L.append("    .reg .f32   %oh, %o2;")
    else:
        L.append("    .reg .f32   %os, %nm, %e1, %d1, %k;")
        if u: L.append("    .reg .f32   %ot, %oh, %o2;")
        L.append("    mul.f32         %k, scale, 0f3FB8AA3B;")
    for r, a in (("rm", "m"), ("rs", "s"), ("rv", "v")):
        L.append(f"    mov.f32         {r}, {a};")
    L.append("    mov.u32         ri, i;")
    L.append("    mov.u32         rf, f;")
    if u:
        L.append("    mov.f32         rt, t;" if T else "    mov.f32         rt, 0f00000000;")
        L.append("    mov.f32         rh, h;")
        L.append("    mov.f32         r2, a2;" if A2 else "    mov.f32         r2, 0fFF800000;")
    L += warp_stage(T, H, A2, (16, 8, 4, 2, 1), "each warp", lin)
    L.append("    // the 8 warp partials: warp 0 merges them (lanes 0..7; the others")
    L.append("    // carry the identity)")
    L.append("    mov.u32         %t, %tid.x;")
    L.append("    and.b32         %lane, %t, 31;")
    L.append("    shr.u32         %warp, %t, 5;")
    L.append("    setp.ne.u32     %q, %lane, 0;")
    L.append(f"    @%q bra         {P}_W1;")
    L.append("    mov.u32         %b1, sRedP;")
    L.append("    mad.lo.u32      %t, %warp, 32, %b1;")
    L += store_tuple(u)
    L.append(f"{P}_W1:")
    L.append("    bar.sync        0;")
    L.append("    setp.ne.u32     %q, %warp, 0;")
    L.append(f"    @%q bra         {P}_B2;")
    L.append("    mov.f32         rm, 0fFF800000;")
    L.append("    mov.f32         rs, 0f00000000;")
    L.append("    mov.f32         rv, 0fFF800000;")
    L.append("    mov.u32         ri, 0xFFFFFFFF;")
    L.append("    mov.u32         rf, 0;")
    if u:
        L.append("    mov.f32         rt, 0f00000000;")
        L.append("    mov.f32         rh, 0f00000000;")
        L.append("    mov.f32         r2, 0fFF800000;")
    L.append("    setp.ge.u32     %q, %lane, 8;")
    L.append(f"    @%q bra         {P}_ID;")
    L.append("    mov.u32         %b1, sRedP;")
    L.append("    mad.lo.u32      %t, %lane, 32, %b1;")
    L += load_tuple(u)
    L.append(f"{P}_ID:")
    L += warp_stage(T, H, A2, (4, 2, 1), "warp 0", lin)
    L.append("    // warp 0, lane 0 publishes the result")
    L.append("    setp.ne.u32     %q, %lane, 0;")
    L.append(f"    @%q bra         {P}_B2;")
    L.append("    mov.u32         %t, sRedR;")
    L += store_tuple(u)
    L.append(f"{P}_B2:")
    L.append("    bar.sync        0;")
    L.append("    mov.u32         %t, sRedR;")
    L += load_tuple(u)
    L.append("    ret;")
    L.append("}")
    return "\n".join(L) + "\n"

docs = {
 'red_all': ["// red_all: block-wide merge of (max, sum of exp((x - max) * scale)) pairs,",
             "// (value, index) argmax pairs (ties to the lower index) and an OR flag,",
             "// with one pair of barriers. All 256 threads call it and get the result.",
             "// Per warp: the maximum and the argmax value by redux.sync on order keys",
             "// (the argmax index: redux.sync.min over the lanes holding that value),",
             "// the flag by redux.sync.or, each partial's sum rebased to the warp's",
             "// maximum once, then added by a 5-step butterfly; warp 0 merges the 8",
             "// warp partials the same way (3 butterfly steps) and publishes the result",
             "// in sRedR. (The earlier version merged the whole tuple at each of 5",
             "// butterfly steps: 5 shuffles and 2 exponentials per step.)"],
 'red_all_ul': ["// red_all_ul: red_all_u without the sum h (log-linear passes h = 0 and",
                "// gets it back unchanged): one shuffle fewer per butterfly step."],
 'red_all_u': ["// red_all_u: red_all (the same steps in the same order, so max, sum and",
               "// argmax are bit-identical to it) with the uncertainty fields riding",
               "// along: t (sum e^y y at the partial's max, rebased with the sum), h (a",
               "// plain sum) and the second largest a2 (the largest is the argmax value v:",
               "// the other lanes' values and every lane's a2, one more redux.sync). One",
               "// pair of barriers for all.",
               "// Returns (max, sum, argmax value, index, flag, T, h, second largest)."],
 'red_lin': ["// red_lin: red_all for linear pass 2 without a renormalization, where",
             "// every thread's (max, sum) is (-inf, 0) (only the renormalization's",
             "// steps move them): the argmax and flag alone, red_all's instructions",
             "// for them, so the same bits; m and s come back unchanged (red_all gives",
             "// back exactly -inf and 0 for them). Saves the two max reductions, their",
             "// rebases and the butterflies."],
 'red_lin_u': ["// red_lin_u: red_all_u for the same case (every (max, sum, T) is",
               "// (-inf, 0, 0)): the argmax, second largest, flag and h alone, the same",
               "// bits as red_all_u; m, s, t come back unchanged. Saves the two max",
               "// reductions, their rebases and two of the three butterflies."],
}
ARGS = {'red_all': (0, 0, 0), 'red_all_ul': (1, 0, 1), 'red_all_u': (1, 1, 1),
        'red_lin': (0, 0, 0, True), 'red_lin_u': (1, 1, 1, True)}


def gen(name):
    a = ARGS[name]
    return func(name, *a[:3], list(docs[name]), *a[3:])


def span(s, start_marker, fname):
    a = s.index(start_marker)
    f = s.index(f'      {fname}(', a)
    return a, s.index('\n}\n', f) + 3


src = open(PTX).read()
out = src
DECL = ('.shared .align 16 .b8 sRedP[256];   // red_all, red_all_u: 8 warps x 32 bytes\n'
        '.shared .align 16 .b8 sRedR[48];    // their result\n')
a, e = span(out, '// red_all: block-wide merge', 'red_all')
assert DECL in out[a:e]
new = gen('red_all')
i = new.index('.func')
out = out[:a] + new[:i] + DECL + new[i:] + out[e:]
for n, m in (('red_all_u', '// red_all_u: red_all (the same steps'),
             ('red_all_ul', '// red_all_ul: red_all_u without'),
             ('red_lin', '// red_lin: red_all for linear pass 2'),
             ('red_lin_u', '// red_lin_u: red_all_u for')):
    a, e = span(out, m, n)
    out = out[:a] + gen(n) + out[e:]
if '--write' in sys.argv:
    open(PTX, 'w').write(out)
elif out != src:
    sys.exit('ptx/gen/ensemble_red: red_all / red_all_ul / red_all_u / red_lin / red_lin_u in ptx/ensemble.ptx are stale '
             '(run python3 ptx/gen/ensemble_red/gen.py --write)')
else:
    print('ptx/gen/ensemble_red: ptx/ensemble.ptx is current')
