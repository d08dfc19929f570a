#!/usr/bin/env python3
"""Regenerates ensemble_v2s at the end of ptx/ensemble.ptx.

ensemble_v2s is ensemble_v2's text (copied, so the two do not drift apart)
with its output phases replaced by the sampler: the fragments beside this
script (v2s_header.ptx: the contract and v2s_select; v2s_sample.ptx: the
sampling pass, the record merge and the outputs).

Which ensemble_v2: the one at V2_REV (a commit of this repository, read with
git), plus the end-of-row barrier fix below, until a GPU run of the sampling
suite validates a newer one. ensemble_v2's per-token fast paths and lean
reductions of 2026-12-04 are not in the sampler yet: they were measured and
conformance-tested on the H200 in ensemble_v2, and that session ran out of
device time before the sampling suite could run on a regenerated
ensemble_v2s. To move the sampler onto the current ensemble_v2: set V2_REV
to None (the file's own ensemble_v2), fix the transforms below where they
no longer match, --write, ptx/check.sh, then run cuda/tests/conformance.rs's
sampling_cpu_and_gpu_pick_the_same_token on the GPU machine.
Usage: python3 ptx/gen/ensemble_v2s/gen.py [--write]: with --write it rewrites
ptx/ensemble.ptx from the "// ==== ensemble_v2s ====" marker on (run
ptx/check.sh after); without, it checks that the file is current (CI).
"""
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PTX = os.path.join(HERE, '..', '..', 'ensemble.ptx')
src = open(PTX).read()
# The ensemble_v2 the sampler derives from (see the docstring); None: the
# file's own.
V2_REV = 'a99f45df39615bcbedcbd171c37d9a2188af89bf'
if V2_REV is None:
    v2src = src
else:
    import subprocess
    try:
        v2src = subprocess.run(['git', '-C', os.path.join(HERE, '..', '..', '..'), 'show',
                                V2_REV + ':ptx/ensemble.ptx'],
                               check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit('ptx/gen/ensemble_v2s: cannot read ptx/ensemble.ptx at %s with git (%s); '
                 'in a shallow clone: git fetch --unshallow' % (V2_REV, e))
lines = v2src.split('\n')
# ensemble_v2 entry: from its .visible line to the closing brace after V2_EXIT
start = next(i for i, l in enumerate(lines) if l.startswith('.visible .entry ensemble_v2(.param'))
end = next(i for i in range(start, len(lines)) if lines[i] == '}' and lines[i-2] == 'V2_EXIT:')
body = '\n'.join(lines[start:end + 1])

def rep(old, new, count=1):
    global body
    n = body.count(old)
    assert n == count, (n, old[:80])
    body = body.replace(old, new)

# the end-of-row barrier, non-aligned (as ensemble_v2's since V2_REV)
rep('    bar.sync        0;      // shared row state is rewritten next\n',
    "    // shared row state is rewritten next. barrier.sync (not bar.sync, the\n    // .aligned form): a warp's threads reach this point on different paths\n    // (thread 0 or block 0 alone stores a row's values, rows end early on\n    // NaN or masked), and the aligned form requires them to execute the\n    // same barrier instruction together; compute-sanitizer's synccheck\n    // reported divergent threads at the aligned form. ptxas 13.0 emits the\n    // same SASS for both here.\n    barrier.sync    0;\n")

rep('.visible .entry ensemble_v2(.param .align 8 .b8 p[520])', '.visible .entry ensemble_v2s(.param .align 8 .b8 p[552])')
# extra registers
rep('    .reg .f32   %x<8>, %s<8>;\n',
    '    .reg .f32   %x<8>, %s<8>;\n'
    '    .reg .pred  %sk, %sq;\n'
    '    .reg .b32   %sd0, %sd1, %stp, %bidx, %w0, %w1, %w2, %w3, %q4;\n'
    '    .reg .f32   %aA, %aB, %aC, %itau, %mps, %tmin, %lmax, %best, %bl, %ub, %g, %yv, %prn, %pr;\n'
    '    .reg .pred  %gq, %sel, %fl;\n    .reg .b32   %floor, %topk, %pb;\n    .reg .f32   %topp;\n    .reg .b64   %hb;\n    .reg .b32   %pk0, %pk1, %plo0, %phi0, %plo1, %phi1, %gr;\n    .reg .b64   %pa64;\n    .reg .f32   %gu, %gd, %gs, %gz, %gp, %ge;\n')
# linear phase 2: always keep u in shared memory; fold the (max, sum) only with RENORM
rep('''V2_L2_ARGDONE:
    @%renorm bra    V2_L2_STATS;
    setp.eq.u64     %q, %logp, 0;
    @%q bra         V2_L2_WP;
    call v2_store8, (%logp, %lps, %row, %base, %nout, %s0, %s1, %s2, %s3, %s4, %s5, %s6, %s7);
V2_L2_WP:
    setp.eq.u64     %q, %prob, 0;
    @%q bra         V2_L2_NEXT;
''', '''V2_L2_ARGDONE:
''')
i = body.index('V2_L2_ARGDONE:\n')
j = body.index('V2_L2_STATS:', i)
# drop the probability stores between ARGDONE and STATS (now unreachable)
body = body[:i] + 'V2_L2_ARGDONE:\n' + body[j:]
rep('''    st.shared.v4.f32 [%t], {%s0, %s1, %s2, %s3};
    st.shared.v4.f32 [%t+16], {%s4, %s5, %s6, %s7};
    setp.gt.f32     %q, %vmax, %mt;
    @!%q bra        V2_L2_SUM;''', '''    st.shared.v4.f32 [%t], {%s0, %s1, %s2, %s3};
    st.shared.v4.f32 [%t+16], {%s4, %s5, %s6, %s7};
    @!%renorm bra   V2_L2_NEXT;
    setp.gt.f32     %q, %vmax, %mt;
    @!%q bra        V2_L2_SUM;''')
# row start: block 0 zeroes the team's select histograms (another call's
# records may have left bytes there); the row's first team barrier orders
# it before any block adds into them
rep('''V2_ROW:
    setp.ge.u32     %q, %row, %rows;
    @%q bra         V2_EXIT;
''', '''V2_ROW:
    setp.ge.u32     %q, %row, %rows;
    @%q bra         V2_EXIT;
    ld.param.u32    %topk, [p+532];
    ld.param.f32    %topp, [p+544];
    setp.ne.u32     %sel, %topk, 0;
    setp.lt.or.f32  %sel, %topp, 0f3F800000, %sel;
    setp.ne.or.u32  %q, %c, 0, %q;
    @%q bra         V2S_ZDONE;
    @!%sel bra      V2S_ZDONE;
    mul.lo.u32      %t, %teams, %C;
    mul.wide.u32    %hb, %t, 512;
    add.u64         %hb, %hb, %work;
    add.u64         %hb, %hb, 131072;
    mul.wide.u32    %o, %team, 6144;
    add.u64         %hb, %hb, %o;
    mul.wide.u32    %o, %th, 8;
    add.u64         %hb, %hb, %o;
    st.relaxed.gpu.global.u64 [%hb], 0;
    st.relaxed.gpu.global.u64 [%hb+2048], 0;
    st.relaxed.gpu.global.u64 [%hb+4096], 0;
V2S_ZDONE:
''')
# log-linear phase 2 -> the sampling pass
i = body.index('    // phase 2: log-probabilities from shared memory, then the outputs\n')
j = body.index('    bra.uni         V2_ROW_NEXT;\n', body.index('V2_LL_DONE:', i)) + len('    bra.uni         V2_ROW_NEXT;\n')
body = body[:i] + '''    // L = (s - mx) - lsum (ensemble_v2's log-probabilities)
    mov.f32         %aA, %mx;
    mov.f32         %aB, 0f3F800000;
    mov.f32         %aC, %lsum;
    bra.uni         V2S_SAMPLE;
''' + body[j:]
# linear: after the merge, to the sampling pass
i = body.index('    @%renorm bra    V2_L3;\n    call v2_rowvals, (%am, %lz, %row, %c, %rbi, %lnw);\n')
j = body.index('V2_ROW_NAN:', i)
body = body[:i] + '''    @%renorm bra    V2_L3;
    // no renormalization: L = u (ensemble_v2 writes u as it is)
    setp.eq.f32     %q, %bv, %ninf;
    @%q bra         V2_ROW_MASKED;
    mov.f32         %aA, 0f00000000;
    mov.f32         %aB, 0f3F800000;
    mov.f32         %aC, 0f00000000;
    bra.uni         V2S_SAMPLE;
V2_L3:
    setp.eq.f32     %q, %mx, %ninf;
    @%q bra         V2_ROW_MASKED;
    lg2.approx.ftz.f32 %lsum, %sum;
    mul.f32         %lsum, %lsum, 0f3F317218;
    // L = ((u - mx) / T_out) - lsum (ensemble_v2's renormalized outputs)
    mov.f32         %aA, %mx;
    mov.f32         %aB, %inv_out;
    mov.f32         %aC, %lsum;
    bra.uni         V2S_SAMPLE;

''' + open(os.path.join(HERE, 'v2s_sample.ptx')).read() + '''
''' + body[j:]
rep('''V2_ROW_NAN:
    call v2_fill, (%logp, %lps, %prob, %pbs, %row, %lo, %hi, %nan, %nan);
    call v2_rowvals, (%am, %lz, %row, %c, 0xFFFFFFFF, %nan);''', '''V2_ROW_NAN:
    call v2_rowvals, (%am, %lz, %row, %c, 0xFFFFFFFF, %nan);''')
rep('''V2_ROW_MASKED:
    mov.f32         %y, 0f00000000;
    call v2_fill, (%logp, %lps, %prob, %pbs, %row, %lo, %hi, %ninf, %y);
    call v2_rowvals, (%am, %lz, %row, %c, 0xFFFFFFFF, %ninf);''', '''V2_ROW_MASKED:
    call v2_rowvals, (%am, %lz, %row, %c, 0xFFFFFFFF, %ninf);''')
assert 'v2_store8' not in body and 'v2_fill' not in body, 'stores left'
header = open(os.path.join(HERE, 'v2s_header.ptx')).read() + open(os.path.join(HERE, 'v2s_select.ptx')).read()
marker = '\n// ==== ensemble_v2s ====\n'
if marker in src:
    src = src[:src.index(marker)]
out = src.rstrip('\n') + '\n' + marker + header + body + '\n'
if '--write' in sys.argv:
    open(PTX, 'w').write(out)
    print('ptx/gen/ensemble_v2s: wrote ensemble_v2s (%d lines)' % body.count('\n'))
elif open(PTX).read() != out:
    sys.exit('ptx/gen/ensemble_v2s: ptx/ensemble.ptx differs from the generator '
             '(run python3 ptx/gen/ensemble_v2s/gen.py --write)')
else:
    print('ptx/gen/ensemble_v2s: ptx/ensemble.ptx is current')
