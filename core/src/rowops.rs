//! Vectorizable row kernels shared by the softmax family, the ensemble and
//! distillation. Internal: every function works on already-validated `f32`
//! tiles and is written as fixed-width lane loops so that LLVM emits SIMD.

use crate::element::{Element, widen};
use crate::math::{exp, exp_nonpos, ln, max_fast};

/// Lanes of the SIMD-shaped loops (two AVX or four SSE registers).
pub(crate) const LANES: usize = 16;
/// Elements converted and processed at a time; a tile of `f32` stays in L1.
pub(crate) const TILE: usize = 2048;

/// Maximum of `t` (NaN-blind) and whether `t` holds a NaN or `+inf`.
#[inline(always)]
pub(crate) fn max_and_bad(t: &[f32]) -> (f32, bool) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut bad = [0u32; LANES];
    let mut it = t.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            mx[j] = max_fast(c[j], mx[j]);
            bad[j] |= (!(c[j] < f32::INFINITY) & (c[j] != f32::NEG_INFINITY)) as u32;
        }
    }
    let mut m = f32::NEG_INFINITY;
    let mut b = 0u32;
    for &x in it.remainder() {
        m = max_fast(x, m);
        b |= (!(x < f32::INFINITY) & (x != f32::NEG_INFINITY)) as u32;
    }
    for j in 0..LANES {
        m = max_fast(mx[j], m);
        b |= bad[j];
    }
    (m, b != 0)
}

/// `sum_i exp((t_i - m) * inv_t)` with lane-wise partial sums.
/// Requires `m` finite and `>= t_i` for all finite `t_i`.
#[inline(always)]
pub(crate) fn sum_exp_shifted(t: &[f32], m: f32, inv_t: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut it = t.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            acc[j] += exp_nonpos((c[j] - m) * inv_t);
        }
    }
    let mut s = 0.0f32;
    for &x in it.remainder() {
        s += exp_nonpos((x - m) * inv_t);
    }
    pairwise_sum(&acc) + s
}

/// Like [`sum_exp_shifted`], also storing each term in `out` (same length).
#[inline(always)]
pub(crate) fn exp_shift_store(t: &[f32], m: f32, inv_t: f32, out: &mut [f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut it = t.chunks_exact(LANES);
    let mut ot = out.chunks_exact_mut(LANES);
    for (c, o) in (&mut it).zip(&mut ot) {
        for j in 0..LANES {
            let e = exp_nonpos((c[j] - m) * inv_t);
            o[j] = e;
            acc[j] += e;
        }
    }
    let mut s = 0.0f32;
    for (&x, o) in it.remainder().iter().zip(ot.into_remainder()) {
        let e = exp_nonpos((x - m) * inv_t);
        *o = e;
        s += e;
    }
    pairwise_sum(&acc) + s
}

/// [`sum_exp_shifted`] that also returns `sum_i e_i y_i` with
/// `y_i = (t_i - m) * inv_t` and `e_i = exp(y_i)` (the entropy term; a
/// token with `e_i = 0` adds 0, never `0 * -inf`). When `out` is given, each
/// `e_i` is stored there as well.
#[inline(always)]
pub(crate) fn sum_exp_ent(t: &[f32], m: f32, inv_t: f32, mut out: Option<&mut [f32]>) -> (f32, f32) {
    let mut acc = [0.0f32; LANES];
    let mut ent = [0.0f32; LANES];
    let mut it = t.chunks_exact(LANES);
    let mut pos = 0;
    for c in &mut it {
        let mut e = [0.0f32; LANES];
        for j in 0..LANES {
            let y = (c[j] - m) * inv_t;
            e[j] = exp_nonpos(y);
            acc[j] += e[j];
            // exp is 0 below -104, so clamping y there changes no term and
            // turns 0 * -inf into 0 * -104.
            ent[j] += e[j] * max_fast(y, -104.0);
        }
        if let Some(o) = out.as_deref_mut() {
            o[pos..pos + LANES].copy_from_slice(&e);
        }
        pos += LANES;
    }
    let (mut s, mut h) = (0.0f32, 0.0f32);
    for (i, &x) in it.remainder().iter().enumerate() {
        let y = (x - m) * inv_t;
        let e = exp_nonpos(y);
        s += e;
        h += e * max_fast(y, -104.0);
        if let Some(o) = out.as_deref_mut() {
            o[pos + i] = e;
        }
    }
    (pairwise_sum(&acc) + s, pairwise_sum(&ent) + h)
}

/// Replaces mixture probabilities `p >= 1e-30` (the linear pass's fast
/// path) by their logarithms and returns `sum p ln p` of the replaced values.
#[inline(always)]
pub(crate) fn ln_inplace_ent(a: &mut [f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut it = a.chunks_exact_mut(LANES);
    for c in &mut it {
        for j in 0..LANES {
            let l = crate::math::ln_pos(c[j]);
            acc[j] += c[j] * l;
            c[j] = l;
        }
    }
    let mut h = 0.0f32;
    for x in it.into_remainder() {
        let l = crate::math::ln_pos(*x);
        h += *x * l;
        *x = l;
    }
    pairwise_sum(&acc) + h
}

/// [`max_and_bad`] that also returns the second largest value (counting
/// multiplicity): `(max, second, bad)`.
#[inline(always)]
pub(crate) fn max2_and_bad(t: &[f32]) -> (f32, f32, bool) {
    let mut m1 = [f32::NEG_INFINITY; LANES];
    let mut m2 = [f32::NEG_INFINITY; LANES];
    let mut bad = [0u32; LANES];
    let mut it = t.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            let x = c[j];
            let lo = if x < m1[j] { x } else { m1[j] };
            m2[j] = max_fast(lo, m2[j]);
            m1[j] = max_fast(x, m1[j]);
            bad[j] |= (!(x < f32::INFINITY) & (x != f32::NEG_INFINITY)) as u32;
        }
    }
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    let mut bd = 0u32;
    let mut fold = |v1: f32, v2: f32| {
        let lo = if v1 < a { v1 } else { a };
        b = max_fast(max_fast(lo, v2), b);
        a = max_fast(v1, a);
    };
    for j in 0..LANES {
        fold(m1[j], m2[j]);
        bd |= bad[j];
    }
    for &x in it.remainder() {
        fold(x, f32::NEG_INFINITY);
        bd |= (!(x < f32::INFINITY) & (x != f32::NEG_INFINITY)) as u32;
    }
    (a, b, bd != 0)
}

/// The largest and second largest values of `x` counting multiplicity
/// (`-inf` where there are none). Meaningless when `x` holds a NaN: the
/// callers' rows are NaN rows then, and their top-2 is discarded.
#[inline(always)]
pub(crate) fn top2(x: &[f32]) -> (f32, f32) {
    let (a, b, _) = max2_and_bad(x);
    (a, b)
}

/// Sum of 16 lanes as a balanced tree.
#[inline(always)]
pub(crate) fn pairwise_sum(a: &[f32; LANES]) -> f32 {
    let mut b = [0.0f32; 8];
    for j in 0..8 {
        b[j] = a[j] + a[j + 8];
    }
    let c = [b[0] + b[4], b[1] + b[5], b[2] + b[6], b[3] + b[7]];
    (c[0] + c[2]) + (c[1] + c[3])
}

/// Running (max, sum of exp) of a stream of values, in "raw" units: the
/// represented quantity is `sum exp((x - max) * inv_t)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Online {
    pub(crate) max: f32,
    pub(crate) sum: f32,
    pub(crate) bad: bool,
}

impl Online {
    pub(crate) const EMPTY: Online = Online {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        bad: false,
    };

    /// Folds one `f32` tile in.
    #[inline(always)]
    pub(crate) fn push(&mut self, t: &[f32], inv_t: f32) {
        let (cm, cbad) = max_and_bad(t);
        if cbad {
            self.bad = true;
            return;
        }
        if cm > self.max {
            // (old - new) * inv_t is -inf when old is -inf: exp gives 0.
            self.sum *= exp((self.max - cm) * inv_t);
            self.max = cm;
        }
        if self.max > f32::NEG_INFINITY {
            self.sum += sum_exp_shifted(t, self.max, inv_t);
        }
    }

    /// [`Online::push`] that also maintains `ent`, `sum exp(y) y` with
    /// `y = (x - max) * inv_t` (relative to the current maximum).
    #[inline(always)]
    pub(crate) fn push_ent(&mut self, t: &[f32], inv_t: f32, ent: &mut f32) {
        let (cm, cbad) = max_and_bad(t);
        if cbad {
            self.bad = true;
            return;
        }
        if cm > self.max {
            if self.sum > 0.0 {
                // Shifting the reference from old to new max by d <= 0:
                // sum' = e^d sum, ent' = e^d (ent + d sum).
                let d = (self.max - cm) * inv_t;
                let e = exp(d);
                *ent = e * (*ent + d * self.sum);
                self.sum *= e;
            }
            self.max = cm;
        }
        if self.max > f32::NEG_INFINITY {
            let (s, h) = sum_exp_ent(t, self.max, inv_t, None);
            self.sum += s;
            *ent += h;
        }
    }

    /// [`Online::push`] with the per-row uncertainty statistics in the same
    /// passes: `ent` as in [`Online::push_ent`] when `ENT`, and the running
    /// two largest values `top` (merged like [`top2`]) when `TOP`, taken
    /// from the pass that finds the tile's maximum.
    #[inline(always)]
    pub(crate) fn push_unc<const ENT: bool, const TOP: bool>(
        &mut self,
        t: &[f32],
        inv_t: f32,
        ent: &mut f32,
        top: &mut (f32, f32),
    ) {
        let (cm, cbad) = if TOP {
            let (a1, a2, bad) = max2_and_bad(t);
            let lo = if a1 < top.0 { a1 } else { top.0 };
            top.1 = max_fast(max_fast(lo, a2), top.1);
            top.0 = max_fast(a1, top.0);
            (a1, bad)
        } else {
            max_and_bad(t)
        };
        if cbad {
            self.bad = true;
            return;
        }
        if cm > self.max {
            if ENT && self.sum > 0.0 {
                let d = (self.max - cm) * inv_t;
                let e = exp(d);
                *ent = e * (*ent + d * self.sum);
                self.sum *= e;
            } else {
                self.sum *= exp((self.max - cm) * inv_t);
            }
            self.max = cm;
        }
        if self.max > f32::NEG_INFINITY {
            if ENT {
                let (s, h) = sum_exp_ent(t, self.max, inv_t, None);
                self.sum += s;
                *ent += h;
            } else {
                self.sum += sum_exp_shifted(t, self.max, inv_t);
            }
        }
    }

    /// `ln sum exp((x - max) * inv_t)`; the row's log-sum-exp (scaled
    /// units) is `max * inv_t + log_sum()`.
    #[inline(always)]
    pub(crate) fn log_sum(&self) -> f32 {
        ln(self.sum)
    }
}

/// Online statistics of a row of any element type, tile by tile.
#[inline(always)]
pub(crate) fn row_online<T: Element>(row: &[T], inv_t: f32, tile: &mut [f32; TILE]) -> Online {
    let mut o = Online::EMPTY;
    for chunk in row.chunks(TILE) {
        let t = &mut tile[..chunk.len()];
        widen(chunk, t);
        o.push(t, inv_t);
        if o.bad {
            break;
        }
    }
    o
}

/// What a row holds that the fast path cannot handle: NaN, or `+inf` (and how
/// many). Only called after a tile reported "bad".
pub(crate) fn classify_bad<T: Element>(row: &[T]) -> Bad {
    let mut n_inf = 0usize;
    for x in row {
        let x = x.to_f32();
        if x.is_nan() {
            return Bad::Nan;
        }
        if x == f32::INFINITY {
            n_inf += 1;
        }
    }
    Bad::PosInf(n_inf)
}

/// Classification of a row with non-finite maxima.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bad {
    /// At least one NaN.
    Nan,
    /// No NaN; this many `+inf` entries (at least one).
    PosInf(usize),
}

/// `out_i = (x_i - m) * inv_t - c` (log-softmax finish).
#[inline(always)]
pub(crate) fn write_shift_scale<T: Element>(x: &[T], m: f32, inv_t: f32, c: f32, out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v.to_f32() - m) * inv_t - c;
    }
}

/// `out_i = exp((x_i - m) * inv_t) * scale` (softmax finish).
#[inline(always)]
pub(crate) fn write_exp_scale<T: Element>(x: &[T], m: f32, inv_t: f32, scale: f32, out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = exp((v.to_f32() - m) * inv_t) * scale;
    }
}

/// `out_i = exp(x_i - c)` in place.
#[inline(always)]
pub(crate) fn exp_shift_inplace(x: &mut [f32], c: f32) {
    for v in x.iter_mut() {
        *v = exp(*v - c);
    }
}

/// `out_i = exp(x_i - c)` from `x` into `out`.
#[inline(always)]
pub(crate) fn exp_shift_into(x: &[f32], c: f32, out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = exp(*v - c);
    }
}

/// Index of the first maximum of `x` among values `> -inf`, or `None` when
/// every value is `-inf` (or `x` is empty). NaN values are never chosen.
#[inline(always)]
pub(crate) fn argmax(x: &[f32]) -> Option<usize> {
    let (m, _) = max_and_bad(x);
    if m == f32::NEG_INFINITY || m.is_nan() {
        return None;
    }
    x.iter().position(|&v| v == m)
}
