//! The CPU reference MoE layer: the ground truth the GPU kernels are tested
//! against.
//!
//! For token `t` with picks `(ids[t, j], weights[t, j])`, `j = 0..k`:
//!
//! ```text
//! g, u   = W13[e][0..I] . x_t,  W13[e][I..2I] . x_t     (gate rows, then up rows)
//! a      = silu(g) * u                                   (SwiGLU)
//! y_slot = W2[e] . a                                     ([H] per slot)
//! out_t  = sum_j weights[t, j] * y_slot(t, j)            (in j order)
//! ```
//!
//! # Layouts
//!
//! - `x`: `[T, H]` activations ([`Rows`], any stride), `f32`/`f16`/`bf16`.
//! - `w13`: `[L, 2I, H]` row-major, `H` contiguous: local expert `l`'s gate
//!   rows `0..I` then up rows `I..2I` (vLLM's `w13`, i.e. `w1` and `w3`
//!   stacked), global expert `range.first + l`.
//! - `w2`: `[L, H, I]` row-major, `I` contiguous (vLLM's `w2`).
//! - `ids`, `weights`: the `[T, k]` routing; `plan`: the expert-sorted plan
//!   of [`sort_by_expert`](super::plan::sort_by_expert) for the same `ids`
//!   and `range`.
//! - `out`: `[T, H]` in any [`Element`] type (`f32`, or rounded once to
//!   `bf16`/`f16` at the end).
//!
//! # Semantics
//!
//! - Slots routed to a non-local expert or to [`NO_EXPERT`] contribute
//!   nothing (expert parallelism: the ranks' outputs add up to the full
//!   layer, up to the order of that final addition).
//! - A slot whose routing weight is exactly `0` contributes exactly `0`: it
//!   is not computed (so an inf or NaN its expert would produce cannot leak
//!   through `0 * inf`). A NaN weight (a NaN gating row) makes the output
//!   row NaN.
//! - A token with no contributing slot gets an all-zero row.
//!
//! # Arithmetic
//!
//! All in `f32`: inputs widened exactly; each dot product accumulates in 8
//! lane partial sums (lane `l` takes elements `l, l + 8, ...` in order)
//! reduced as `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`, plus the
//! tail (`len % 8` elements, sequential) added last; the weight multiplies
//! the finished `y` (`w * y`), and the `k` products are added in `j` order
//! starting from `0`. No step depends on how tokens are batched or experts
//! scheduled, so results are deterministic and batch-invariant. A GPU
//! kernel with another accumulation order matches within rounding
//! (relative `~1e-6 * sqrt(H + I)`), not bitwise.
//!
//! The expert MLPs run blocked: [`BLOCK`] gathered rows per expert at a
//! time, each weight row widened once per block and applied to 4 rows at
//! once.

use super::{ExpertRange, NO_EXPERT, check_experts, check_ids, check_slots};
use crate::element::{DType, Element, widen};
use crate::error::{Error, ensure, ensure_len};
use crate::math::act::silu;
use crate::rows::{Rows, RowsMut};
use crate::softmax::Report;

/// Rows gathered per expert block.
pub const BLOCK: usize = 16;
const LANES: usize = 8;

/// The experts' weights (local experts only).
#[derive(Debug, Clone, Copy)]
pub struct Experts<'a, W> {
    /// `[L, 2I, H]`: gate rows, then up rows.
    pub w13: &'a [W],
    /// `[L, H, I]`.
    pub w2: &'a [W],
    /// Hidden size `H`.
    pub hidden: usize,
    /// Intermediate size `I`.
    pub inter: usize,
    /// The global experts these weights hold (`L = range.len()`).
    pub range: ExpertRange,
}

/// The routing of the `T` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Routing<'a> {
    /// `[T, k]` expert ids (global; [`NO_EXPERT`] allowed).
    pub ids: &'a [u32],
    /// `[T, k]` routing weights.
    pub weights: &'a [f32],
    /// Experts per token.
    pub k: usize,
    /// Total experts `E` (over all ranks).
    pub experts: usize,
}

/// An expert-sorted plan (from [`sort_by_expert`](super::plan::sort_by_expert)).
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    /// Slot ids grouped by local expert, increasing within an expert.
    pub sorted: &'a [u32],
    /// `L + 1` offsets into `sorted`.
    pub offsets: &'a [u64],
}

/// `f32` scratch [`moe_layer`] needs: `T*k*H` (per-slot expert outputs)
/// `+ BLOCK * (H + 3I) + max(H, I)`.
///
/// Errors: [`Error::SizeOverflow`] (`scratch`) when the size overflows.
pub fn layer_scratch_len(tokens: usize, k: usize, hidden: usize, inter: usize) -> Result<usize, Error> {
    let of = Error::SizeOverflow { arg: "scratch" };
    let ys = tokens
        .checked_mul(k)
        .and_then(|n| n.checked_mul(hidden))
        .ok_or(of)?;
    let blk = inter
        .checked_mul(3)
        .and_then(|v| v.checked_add(hidden))
        .and_then(|v| v.checked_mul(BLOCK))
        .ok_or(of)?;
    ys.checked_add(blk)
        .and_then(|v| v.checked_add(hidden.max(inter)))
        .ok_or(of)
}

/// Sum of 8 lanes in the documented tree order.
#[inline(always)]
fn tree8(a: &[f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// `R` dot products of the rows `x[r]` with `w` (all the same length).
#[inline(always)]
fn dot_rows<const R: usize>(x: [&[f32]; R], w: &[f32]) -> [f32; R] {
    let n = w.len();
    let body = n - n % LANES;
    let mut acc = [[0.0f32; LANES]; R];
    let mut c = 0;
    while c < body {
        let wc: &[f32; LANES] = w[c..c + LANES].try_into().expect("lane chunk");
        for r in 0..R {
            let xc: &[f32; LANES] = x[r][c..c + LANES].try_into().expect("lane chunk");
            for l in 0..LANES {
                acc[r][l] += xc[l] * wc[l];
            }
        }
        c += LANES;
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        let mut tail = 0.0f32;
        for i in body..n {
            tail += x[r][i] * w[i];
        }
        out[r] = tree8(&acc[r]) + tail;
    }
    out
}

/// A weight row as `f32`: borrowed for `f32` weights, widened otherwise.
#[inline(always)]
fn weight_row<'s, W: Element>(row: &'s [W], buf: &'s mut [f32]) -> &'s [f32] {
    if W::DTYPE == DType::F32 {
        bytemuck::cast_slice(row)
    } else {
        let b = &mut buf[..row.len()];
        widen(row, b);
        b
    }
}

/// `y[r][o] = w_o . x_r` for every weight row `o` of `w` (`rows_out` rows of
/// `len`), over the `bm` rows of `x` (stride `len`); `y` has stride `ys`.
#[allow(clippy::too_many_arguments)]
fn block_matmul<W: Element>(
    x: &[f32],
    bm: usize,
    len: usize,
    w: &[W],
    rows_out: usize,
    wbuf: &mut [f32],
    mut store: impl FnMut(usize, usize, f32),
) {
    for o in 0..rows_out {
        let wr = weight_row(&w[o * len..(o + 1) * len], wbuf);
        let mut r = 0;
        while r + 4 <= bm {
            let d = dot_rows(
                [
                    &x[r * len..(r + 1) * len],
                    &x[(r + 1) * len..(r + 2) * len],
                    &x[(r + 2) * len..(r + 3) * len],
                    &x[(r + 3) * len..(r + 4) * len],
                ],
                wr,
            );
            for (q, v) in d.into_iter().enumerate() {
                store(r + q, o, v);
            }
            r += 4;
        }
        while r < bm {
            let [v] = dot_rows([&x[r * len..(r + 1) * len]], wr);
            store(r, o, v);
            r += 1;
        }
    }
}

/// Validates the plan against the routing: offsets non-decreasing from 0,
/// every listed slot local to its expert, strictly increasing within the
/// expert, and exactly the local non-dropped slots listed.
fn check_plan(plan: &Plan<'_>, ids: &[u32], range: ExpertRange) -> Result<(), Error> {
    let l = range.len();
    ensure_len("plan.offsets", l + 1, plan.offsets.len())?;
    ensure(
        plan.offsets[0] == 0,
        Error::OutOfRange {
            arg: "plan.offsets",
            index: 0,
        },
    )?;
    for e in 0..l {
        ensure(
            plan.offsets[e] <= plan.offsets[e + 1],
            Error::OutOfRange {
                arg: "plan.offsets",
                index: e + 1,
            },
        )?;
    }
    let total = plan.offsets[l];
    ensure(
        total <= plan.sorted.len() as u64,
        Error::BufferTooShort {
            arg: "plan.sorted",
            needed: total.min(usize::MAX as u64) as usize,
            got: plan.sorted.len(),
        },
    )?;
    let local = ids.iter().filter(|&&e| range.local(e).is_some()).count() as u64;
    ensure(
        total == local,
        Error::OutOfRange {
            arg: "plan.offsets",
            index: l,
        },
    )?;
    for e in 0..l {
        let mut prev: Option<u32> = None;
        for p in plan.offsets[e] as usize..plan.offsets[e + 1] as usize {
            let s = plan.sorted[p];
            let ok = (s as usize) < ids.len()
                && range.local(ids[s as usize]) == Some(e)
                && prev.is_none_or(|q| q < s);
            ensure(
                ok,
                Error::OutOfRange {
                    arg: "plan.sorted",
                    index: p,
                },
            )?;
            prev = Some(s);
        }
    }
    Ok(())
}

/// Runs the MoE layer (module docs) for the `T = x.rows()` tokens into
/// `out`, returning a [`Report`] whose `masked_rows` counts tokens with no
/// contributing slot (all-zero output; normal for tokens routed only to
/// other ranks) and `nan_rows` tokens whose output holds a NaN.
///
/// `scratch` must hold at least [`layer_scratch_len`]`(T, k, H, I)` values;
/// its contents on entry do not matter.
///
/// Errors (checked before anything is written): [`Error::Empty`]
/// (`experts.hidden`, `experts.inter` zero; `routing.experts`),
/// [`Error::OutOfRange`] (`routing.k` = 0; `range` outside the experts; a
/// plan that is not the expert-sorted plan of `ids`: `plan.offsets`,
/// `plan.sorted`), [`Error::LengthMismatch`] (`x.len` vs `H`, `w13`, `w2`,
/// `routing.ids`, `routing.weights`, `out.rows`, `out.len`,
/// `plan.offsets`), [`Error::IndexOutOfBounds`] (`ids`),
/// [`Error::TooLarge`] (`ids`: more than `u32::MAX` slots),
/// [`Error::BufferTooShort`] (`scratch`, `plan.sorted`),
/// [`Error::SizeOverflow`].
///
/// ```
/// use medley_core::moe::{ExpertRange, plan::sort_by_expert};
/// use medley_core::moe::layer::{Experts, Plan, Routing, layer_scratch_len, moe_layer};
/// use medley_core::{Rows, RowsMut};
/// let (t, h, i, e, k) = (2, 4, 3, 3, 2);
/// let x: Vec<f32> = (0..t * h).map(|v| v as f32 * 0.1).collect();
/// let w13: Vec<f32> = (0..e * 2 * i * h).map(|v| ((v % 7) as f32 - 3.0) * 0.05).collect();
/// let w2: Vec<f32> = (0..e * h * i).map(|v| ((v % 5) as f32 - 2.0) * 0.05).collect();
/// let ids = [0u32, 2, 1, 2];
/// let weights = [0.75f32, 0.25, 0.5, 0.5];
/// let (mut sorted, mut offsets) = (vec![0u32; t * k], vec![0u64; e + 1]);
/// sort_by_expert(&ids, e, ExpertRange::all(e), &mut sorted, &mut offsets, None).unwrap();
/// let mut scratch = vec![0.0f32; layer_scratch_len(t, k, h, i).unwrap()];
/// let mut out = vec![0.0f32; t * h];
/// let experts = Experts { w13: &w13, w2: &w2, hidden: h, inter: i, range: ExpertRange::all(e) };
/// let routing = Routing { ids: &ids, weights: &weights, k, experts: e };
/// let plan = Plan { sorted: &sorted, offsets: &offsets };
/// let rep = moe_layer(Rows::dense(&x, t, h).unwrap(), &experts, &routing, &plan, &mut scratch,
///                     RowsMut::dense(&mut out, t, h).unwrap()).unwrap();
/// assert!(rep.is_clean());
/// ```
pub fn moe_layer<A: Element, W: Element, O: Element>(
    x: Rows<'_, A>,
    experts: &Experts<'_, W>,
    routing: &Routing<'_>,
    plan: &Plan<'_>,
    scratch: &mut [f32],
    mut out: RowsMut<'_, O>,
) -> Result<Report, Error> {
    let (h, i2) = (experts.hidden, experts.inter);
    ensure(
        h > 0,
        Error::Empty {
            arg: "experts.hidden",
        },
    )?;
    ensure(i2 > 0, Error::Empty { arg: "experts.inter" })?;
    let k = routing.k;
    ensure(
        k > 0,
        Error::OutOfRange {
            arg: "routing.k",
            index: 0,
        },
    )?;
    check_experts(routing.experts)?;
    let range = experts.range;
    range.check(routing.experts)?;
    let l = range.len();
    let t = x.rows();
    ensure_len("x.len", h, x.len())?;
    ensure_len("out.rows", t, out.rows())?;
    ensure_len("out.len", h, out.len())?;
    let of = Error::SizeOverflow { arg: "w13" };
    let w13_len = l.checked_mul(2 * i2).and_then(|v| v.checked_mul(h)).ok_or(of)?;
    ensure_len("w13", w13_len, experts.w13.len())?;
    ensure_len("w2", w13_len / 2, experts.w2.len())?;
    let n = t
        .checked_mul(k)
        .ok_or(Error::SizeOverflow { arg: "routing.ids" })?;
    check_slots("ids", n)?;
    ensure_len("routing.ids", n, routing.ids.len())?;
    ensure_len("routing.weights", n, routing.weights.len())?;
    check_ids(routing.ids, routing.experts)?;
    let need = layer_scratch_len(t, k, h, i2)?;
    ensure(
        scratch.len() >= need,
        Error::BufferTooShort {
            arg: "scratch",
            needed: need,
            got: scratch.len(),
        },
    )?;
    check_plan(plan, routing.ids, range)?;

    let (ys, rest) = scratch.split_at_mut(n * h);
    let (xb, rest) = rest.split_at_mut(BLOCK * h);
    let (gu, rest) = rest.split_at_mut(BLOCK * 2 * i2);
    let (act, rest) = rest.split_at_mut(BLOCK * i2);
    let wbuf = &mut rest[..h.max(i2)];
    let w13_stride = 2 * i2 * h;
    let w2_stride = h * i2;
    for e in 0..l {
        let run = &plan.sorted[plan.offsets[e] as usize..plan.offsets[e + 1] as usize];
        let w13 = &experts.w13[e * w13_stride..(e + 1) * w13_stride];
        let w2 = &experts.w2[e * w2_stride..(e + 1) * w2_stride];
        let mut slots = [0u32; BLOCK];
        let mut it = run
            .iter()
            .filter(|&&s| routing.weights[s as usize] != 0.0)
            .peekable();
        while it.peek().is_some() {
            let mut bm = 0;
            while bm < BLOCK {
                match it.next() {
                    Some(&s) => {
                        slots[bm] = s;
                        widen(x.row(s as usize / k), &mut xb[bm * h..(bm + 1) * h]);
                        bm += 1;
                    }
                    None => break,
                }
            }
            // Gate and up projections.
            block_matmul(xb, bm, h, w13, 2 * i2, wbuf, |r, o, v| gu[r * 2 * i2 + o] = v);
            for r in 0..bm {
                let g = &gu[r * 2 * i2..(r + 1) * 2 * i2];
                for (j, a) in act[r * i2..(r + 1) * i2].iter_mut().enumerate() {
                    *a = silu(g[j]) * g[i2 + j];
                }
            }
            // Down projection, stored per slot.
            block_matmul(act, bm, i2, w2, h, wbuf, |r, o, v| {
                ys[slots[r] as usize * h + o] = v;
            });
        }
    }
    // Combine in j order.
    let acc = &mut xb[..h];
    let mut rep = Report::default();
    for tok in 0..t {
        acc.fill(0.0);
        let mut any = false;
        for j in 0..k {
            let s = tok * k + j;
            let (id, w) = (routing.ids[s], routing.weights[s]);
            if id == NO_EXPERT || range.local(id).is_none() || w == 0.0 {
                continue;
            }
            any = true;
            for (a, &y) in acc.iter_mut().zip(&ys[s * h..(s + 1) * h]) {
                *a += w * y;
            }
        }
        rep.masked_rows += !any as usize;
        rep.nan_rows += acc.iter().any(|v| v.is_nan()) as usize;
        for (o, &a) in out.row_mut(tok).iter_mut().zip(acc.iter()) {
            *o = O::from_f32(a);
        }
    }
    Ok(rep)
}
