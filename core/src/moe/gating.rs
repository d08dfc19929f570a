//! Per-token top-k gating: router logits `[T, E]` in, expert ids `[T, k]`
//! (`u32`) and routing weights `[T, k]` (`f32`) out.
//!
//! | function | selection on | weights |
//! |---|---|---|
//! | [`topk_softmax`] | logits `x` | `softmax(x)` over all `E` at the picks, optionally renormalized to sum to 1 (vLLM `topk_softmax`; Qwen2-MoE without, Mixtral/Qwen3-MoE with renormalization) |
//! | [`keep_topk_softmax`] | logits `x` | `softmax` over the `k` kept logits (Shazeer et al. 2017 `Softmax(KeepTopK(x))`, Mixtral) |
//! | [`noisy_topk`] | `H = x + N(0,1) * softplus(x_noise)` | `softmax` over the `k` kept `H` (Shazeer et al. 2017, training) |
//! | [`grouped_topk`] | `s + bias`, within the best `topk_group` of `n_group` groups | unbiased `s`, optionally renormalized, times `routed_scaling_factor` (DeepSeek-V2/V3, Llama-4 style biased routing, `topk_sigmoid`) |
//!
//! # Output contract (every function)
//!
//! Row `t` of the outputs is `ids[t*k..(t+1)*k]` and `weights[t*k..(t+1)*k]`.
//! The picks are the `k` largest selection scores in **descending** order;
//! **ties go to the lower expert index** (a stable comparison of the exact
//! `f32` scores; the picks of a row are distinct). Selection on the logits
//! rather than on rounded probabilities: two logits whose probabilities
//! round to the same `f32` are still told apart (vLLM selects on the
//! probabilities; the weights agree, the ids may differ only in such
//! rounding ties).
//!
//! Edge cases (decided per row, counted in the returned [`Report`]):
//!
//! | row | ids | weights | counted in |
//! |---|---|---|---|
//! | any NaN score (a NaN logit, or `H` NaN) | `0, 1, ..., k-1` | NaN | [`Report::nan_rows`] |
//! | every score `-inf` ("fully masked") | `0, 1, ..., k-1` | `0` | [`Report::masked_rows`] |
//! | some `-inf` | picked after every finite one (lower index first) | `0` for those | — |
//! | `m >= 1` entries `+inf` | picked first | the softmax limit: `1/m` on each `+inf` pick (`1/min(m, k)` for a softmax over the kept picks or a renormalized one), `0` elsewhere | — |
//!
//! A NaN row is never cleaned up silently: its weights are NaN, so the MoE
//! output of that token is NaN and flagged, while its ids stay valid for the
//! routing plans.
//!
//! # Arithmetic (bit-exact contract)
//!
//! Inputs are widened to `f32` exactly. `m` is the row maximum. A softmax
//! probability is `exp(x - m) / S` with `S` the [warp-order](super) sum of
//! `exp(x_e - m)` over the row. Kept-logit softmax (also the renormalized
//! [`topk_softmax`]): `exp(x_j - x_0) / sum_j exp(x_j - x_0)`, the sum
//! sequential in `j` (`e / sum`, not `e * (1/sum)`). A renormalization of
//! other weights ([`grouped_topk`]) divides each by their sequential sum.
//!
//! # Cost
//!
//! `O(E)` per token, no sort, no allocation: one vectorizable pass takes the
//! maxima of at most 64 blocks of the row; `tau`, the `k`-th largest block
//! maximum, bounds the `k`-th largest score from below, and only the blocks
//! reaching `tau` are revisited, through an insertion list of `k` entries.
//! Stack scratch: a row of `E` `f32` for `f16`/`bf16` input, noisy and
//! grouped routing (1 KiB up to `E = 256`, 16 KiB above). The result is
//! the same as a stable full sort; the tests check it against one.
//!
//! # Errors (checked before anything is written)
//!
//! [`Error::Empty`] (`logits.len` = 0), [`Error::TooLarge`] (`logits.len`
//! above [`MAX_EXPERTS`]; `k` above [`MAX_K`] or above `E`),
//! [`Error::OutOfRange`] (`k` = 0), [`Error::SizeOverflow`] (`T * k`),
//! [`Error::LengthMismatch`] (`ids`, `weights` not `T * k` long), plus the
//! per-function parameter errors listed on each function.

use super::{MAX_EXPERTS, MAX_GROUPS, MAX_K, TopK, warp_sum_exp};
use crate::element::{DType, Element, widen};
use crate::error::{Error, ensure, ensure_len};
use crate::math::act::{sigmoid, softplus};
use crate::math::{exp, max_fast};
use crate::rng;
use crate::rows::Rows;
use crate::softmax::Report;

/// Capacity of the per-row selection buffer (`k + 1` for the noisy load).
pub(crate) const SEL: usize = MAX_K + 1;

/// Validates `E`, `k` and the output lengths; returns `(E, T)`.
pub(crate) fn check_shape<T>(
    logits: &Rows<'_, T>,
    k: usize,
    ids: &[u32],
    weights: &[f32],
) -> Result<(usize, usize), Error> {
    let e = check_router(logits, k)?;
    let n = logits
        .rows()
        .checked_mul(k)
        .ok_or(Error::SizeOverflow { arg: "ids" })?;
    ensure_len("ids", n, ids.len())?;
    ensure_len("weights", n, weights.len())?;
    Ok((e, logits.rows()))
}

/// Validates the router row length `E` and `k`; returns `E`.
pub(crate) fn check_router<T>(logits: &Rows<'_, T>, k: usize) -> Result<usize, Error> {
    let e = logits.len();
    ensure(e > 0, Error::Empty { arg: "logits.len" })?;
    ensure(
        e <= MAX_EXPERTS,
        Error::TooLarge {
            arg: "logits.len",
            index: 0,
            max: MAX_EXPERTS,
            got: e,
        },
    )?;
    check_k(k, e)?;
    Ok(e)
}

fn check_k(k: usize, e: usize) -> Result<(), Error> {
    ensure(k > 0, Error::OutOfRange { arg: "k", index: 0 })?;
    ensure(
        k <= MAX_K,
        Error::TooLarge {
            arg: "k",
            index: 0,
            max: MAX_K,
            got: k,
        },
    )?;
    ensure(
        k <= e,
        Error::TooLarge {
            arg: "k",
            index: 0,
            max: e,
            got: k,
        },
    )
}

/// What a scan of a row's selection scores found.
pub(crate) struct Scan {
    pub(crate) top: TopK<SEL>,
    pub(crate) nan: bool,
    /// Number of `+inf` scores in the whole row.
    pub(crate) n_inf: usize,
}

/// Most blocks of the selection pre-pass (blocks grow with `E`).
const MAX_BLOCKS: usize = 64;
/// Smallest block of the selection pre-pass.
const MIN_BLOCK: usize = 8;

impl Scan {
    pub(crate) fn new(cap: usize) -> Self {
        Scan {
            top: TopK::new(cap),
            nan: false,
            n_inf: 0,
        }
    }

    /// Offers the scores `vals` of indices `base, base + 1, ...` one by one
    /// (in increasing index order across calls); counts NaN and `+inf`.
    #[inline]
    pub(crate) fn feed(&mut self, vals: &[f32], base: usize) {
        for (l, &x) in vals.iter().enumerate() {
            self.nan |= x.is_nan();
            self.n_inf += (x == f32::INFINITY) as usize;
            self.top.push(x, (base + l) as u32);
        }
    }
}

/// The best `cap` of the scores `vals` (ties to the lower index), with the
/// NaN flag and `+inf` count.
///
/// Same result as pushing every score in index order, in two passes: the
/// maxima of `nb <= 64` blocks (of a multiple of 8 scores) give `tau`, the
/// `cap`-th largest block maximum; at least `cap` scores are `>= tau`, so
/// no score below `tau` can be selected, and only the blocks whose maximum
/// reaches `tau` are scanned again (their scores `>= tau` only).
pub(crate) fn select(vals: &[f32], cap: usize) -> Scan {
    let n = vals.len();
    let bsz = MIN_BLOCK * n.div_ceil(MAX_BLOCKS * MIN_BLOCK).max(1);
    let nb = n.div_ceil(bsz);
    let mut s = Scan::new(cap);
    if nb < 4 * cap {
        s.feed(vals, 0);
        return s;
    }
    let mut bmax = [f32::NEG_INFINITY; MAX_BLOCKS];
    let mut nan = 0u32;
    let mut n_inf = 0u32;
    let mut mini = vals.chunks_exact(MIN_BLOCK);
    for (i, c) in (&mut mini).enumerate() {
        let mut m = [f32::NEG_INFINITY; MIN_BLOCK];
        for l in 0..MIN_BLOCK {
            m[l] = max_fast(c[l], m[l]);
            nan |= c[l].is_nan() as u32;
            n_inf += (c[l] == f32::INFINITY) as u32;
        }
        let m4 = [
            max_fast(m[0], m[4]),
            max_fast(m[1], m[5]),
            max_fast(m[2], m[6]),
            max_fast(m[3], m[7]),
        ];
        let mx = max_fast(max_fast(m4[0], m4[2]), max_fast(m4[1], m4[3]));
        let b = &mut bmax[i * MIN_BLOCK / bsz];
        *b = max_fast(mx, *b);
    }
    for &x in mini.remainder() {
        bmax[nb - 1] = max_fast(x, bmax[nb - 1]);
        nan |= x.is_nan() as u32;
        n_inf += (x == f32::INFINITY) as u32;
    }
    s.n_inf = n_inf as usize;
    if nan != 0 {
        s.nan = true;
        return s;
    }
    let mut bt = TopK::<SEL>::new(cap);
    for (b, &m) in bmax[..nb].iter().enumerate() {
        bt.push(m, b as u32);
    }
    let tau = bt.val[cap - 1];
    for (b, &m) in bmax[..nb].iter().enumerate() {
        if m >= tau {
            let lo = b * bsz;
            for (i, &x) in vals[lo..(lo + bsz).min(n)].iter().enumerate() {
                if x >= tau {
                    s.top.push(x, (lo + i) as u32);
                }
            }
        }
    }
    s
}

/// Runs `f` on an `f32` scratch row of `n` values (`n <= MAX_EXPERTS`),
/// from a small stack buffer when `n` is small (no 16 KiB zero-fill for
/// the common sizes).
#[inline(always)]
pub(crate) fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if n <= 256 {
        let mut b = [0.0f32; 256];
        f(&mut b[..n])
    } else {
        let mut b = [0.0f32; MAX_EXPERTS];
        f(&mut b[..n])
    }
}

/// The best `k` of a router row: borrowed for `f32` input, widened into
/// stack scratch otherwise.
#[inline(always)]
fn select_logits<T: Element>(row: &[T], k: usize) -> Scan {
    if T::DTYPE == DType::F32 {
        select(bytemuck::cast_slice(row), k)
    } else {
        with_scratch(row.len(), |b| {
            widen(row, b);
            select(b, k)
        })
    }
}

/// The fallback of a row decided without computing it: ids `0..k`, every
/// weight `w`.
fn fallback(ids: &mut [u32], weights: &mut [f32], w: f32) {
    for (j, (i, x)) in ids.iter_mut().zip(weights.iter_mut()).enumerate() {
        *i = j as u32;
        *x = w;
    }
}

/// Handles the NaN and fully masked rows; `true` if the row is done.
fn decided(s: &Scan, ids: &mut [u32], weights: &mut [f32], rep: &mut Report) -> bool {
    if s.nan {
        fallback(ids, weights, f32::NAN);
        rep.nan_rows += 1;
        return true;
    }
    if s.top.val[0] == f32::NEG_INFINITY {
        fallback(ids, weights, 0.0);
        rep.masked_rows += 1;
        return true;
    }
    false
}

/// Divides the weights by their sequential sum when it is positive.
#[inline]
fn renorm(w: &mut [f32]) {
    let mut s = 0.0f32;
    for &x in w.iter() {
        s += x;
    }
    if s > 0.0 {
        for x in w.iter_mut() {
            *x /= s;
        }
    }
}

/// Softmax over the `k` kept scores (`top.val[..k]`, descending, not NaN,
/// `val[0] > -inf`) into `w`.
#[inline]
fn kept_softmax(top: &TopK<SEL>, w: &mut [f32]) {
    let k = w.len();
    let m = top.val[0];
    if m == f32::INFINITY {
        let c = top.val[..k].iter().filter(|&&v| v == f32::INFINITY).count();
        let p = 1.0 / c as f32;
        for (x, &v) in w.iter_mut().zip(&top.val[..k]) {
            *x = if v == f32::INFINITY { p } else { 0.0 };
        }
        return;
    }
    let mut s = 0.0f32;
    for (x, &v) in w.iter_mut().zip(&top.val[..k]) {
        *x = exp(v - m);
        s += *x;
    }
    for x in w.iter_mut() {
        *x /= s;
    }
}

/// Softmax over all `E` logits, top-`k`, optional renormalization of the
/// `k` weights: vLLM's `topk_softmax` (from TensorRT-LLM).
///
/// Without `renormalize`, `weights[t, j] = softmax(x_t)[ids[t, j]] =
/// exp(x_j - m) / S` (Qwen2-MoE, DeepSeek-V2-Lite style). With
/// `renormalize`, the weights are those probabilities divided by their sum,
/// which is exactly the softmax over the `k` kept logits: they are computed
/// that way, bit for bit equal to [`keep_topk_softmax`] (one rounding step
/// fewer than vLLM's divide-twice, and no pass over the row for `S`). See
/// the [module docs](self) for the output contract, edge cases and exact
/// arithmetic; errors are the common ones listed there.
///
/// ```
/// use medley_core::{Rows, moe::gating::topk_softmax};
/// // Two tokens, five experts (not a power of two), k = 2.
/// let logits = [1.0f32, 3.0, 0.5, 3.0, -2.0, /* token 1 */ 0.0, 0.0, 0.0, 0.0, 9.0];
/// let (mut ids, mut w) = ([0u32; 4], [0.0f32; 4]);
/// let rep = topk_softmax(Rows::dense(&logits, 2, 5).unwrap(), 2, true, &mut ids, &mut w).unwrap();
/// assert!(rep.is_clean());
/// assert_eq!(ids, [1, 3, 4, 0]); // the tie 3.0 = 3.0 goes to expert 1 first
/// assert_eq!(w[0], 0.5);
/// assert!((w[2] + w[3] - 1.0).abs() < 1e-6);
/// ```
pub fn topk_softmax<T: Element>(
    logits: Rows<'_, T>,
    k: usize,
    renormalize: bool,
    ids: &mut [u32],
    weights: &mut [f32],
) -> Result<Report, Error> {
    let (_, t) = check_shape(&logits, k, ids, weights)?;
    let mut rep = Report::default();
    for (tok, (id, w)) in ids
        .chunks_exact_mut(k)
        .zip(weights.chunks_exact_mut(k))
        .enumerate()
        .take(t)
    {
        let row = logits.row(tok);
        let s = select_logits(row, k);
        if decided(&s, id, w, &mut rep) {
            continue;
        }
        id.copy_from_slice(&s.top.idx[..k]);
        if renormalize {
            // softmax(x)_j / sum_j softmax(x)_j = softmax over the kept logits:
            // computed directly, without the full-row sum.
            kept_softmax(&s.top, w);
            continue;
        }
        let m = s.top.val[0];
        if m == f32::INFINITY {
            let p = 1.0 / s.n_inf as f32;
            for (x, &v) in w.iter_mut().zip(&s.top.val[..k]) {
                *x = if v == f32::INFINITY { p } else { 0.0 };
            }
        } else {
            let sum = warp_sum_exp(row, m);
            for (x, &v) in w.iter_mut().zip(&s.top.val[..k]) {
                *x = exp(v - m) / sum;
            }
        }
    }
    Ok(rep)
}

/// `Softmax(KeepTopK(x, k))` (Shazeer et al. 2017): top-`k` of the logits,
/// weights the softmax over the `k` kept logits only, so they sum to 1 and
/// do not depend on the other `E - k` logits.
///
/// `weights[t, j] = exp(x_j - x_0) / sum_j' exp(x_j' - x_0)` over the row's
/// picks (`x_0` the largest). See the [module docs](self) for the contract
/// and errors.
pub fn keep_topk_softmax<T: Element>(
    logits: Rows<'_, T>,
    k: usize,
    ids: &mut [u32],
    weights: &mut [f32],
) -> Result<Report, Error> {
    // The renormalized topk_softmax computes exactly this (see there).
    topk_softmax(logits, k, true, ids, weights)
}

/// Where the noise of [`noisy_topk`] comes from.
///
/// The standard-normal sample of token `t` (row `t` of the call) and expert
/// `e` is [`rng::normal`]`(seed, [layer, 0], (token_offset + t) * E + e)`:
/// a kernel (or a later call over the next chunk of tokens, with
/// `token_offset` advanced by the rows already done) draws the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Noise {
    /// Seed of the generator (vary it per training step).
    pub seed: u64,
    /// Stream word 0: the MoE layer, so layers draw independent noise.
    pub layer: u32,
    /// Global index of the call's first token.
    pub token_offset: u64,
}

impl Noise {
    /// The standard-normal sample for row `token` of a call over `experts`
    /// experts and expert `expert` (no overflow check: [`noisy_topk`]
    /// validates the range once).
    #[inline]
    pub fn sample(&self, experts: usize, token: usize, expert: usize) -> f32 {
        let index = (self.token_offset + token as u64) * experts as u64 + expert as u64;
        rng::normal(self.seed, [self.layer, 0], index)
    }

    /// Checks that every index of `tokens` rows of `experts` fits `u64`.
    pub(crate) fn check(&self, tokens: usize, experts: usize) -> Result<(), Error> {
        self.token_offset
            .checked_add(tokens as u64)
            .and_then(|v| v.checked_mul(experts as u64))
            .map(|_| ())
            .ok_or(Error::SizeOverflow {
                arg: "noise.token_offset",
            })
    }
}

/// The noisy logit `H = x + z * softplus(x_noise)`, in that `f32` order.
#[inline(always)]
pub fn noisy_logit(clean: f32, noise_logit: f32, z: f32) -> f32 {
    clean + z * softplus(noise_logit)
}

/// Noisy top-k gating (Shazeer et al. 2017), for training:
/// `H(x)_e = x_e + z_e * softplus(n_e)` with `x = clean` (the router logits
/// `x W_g`), `n = noise_logits` (`x W_noise`) and `z_e` standard normal from
/// [`Noise`]; then `Softmax(KeepTopK(H, k))` exactly as
/// [`keep_topk_softmax`] applied to `H` ([`noisy_logit`] gives the `f32`
/// formula). At inference use [`keep_topk_softmax`] on the clean logits.
///
/// A NaN `H` (a NaN input, or `-inf + inf` from an infinite clean logit
/// meeting infinite noise) makes the row NaN; a row whose every `H` is
/// `-inf` is masked.
///
/// Errors: the common ones (module docs), plus [`Error::LengthMismatch`]
/// (`noise_logits.rows`, `noise_logits.len`) when the two views differ in
/// shape and [`Error::SizeOverflow`] (`noise.token_offset`) when a noise
/// index would overflow `u64`.
pub fn noisy_topk<T: Element>(
    clean: Rows<'_, T>,
    noise_logits: Rows<'_, T>,
    k: usize,
    noise: Noise,
    ids: &mut [u32],
    weights: &mut [f32],
) -> Result<Report, Error> {
    let (e, t) = check_shape(&clean, k, ids, weights)?;
    ensure_len("noise_logits.rows", t, noise_logits.rows())?;
    ensure_len("noise_logits.len", e, noise_logits.len())?;
    noise.check(t, e)?;
    let mut rep = Report::default();
    for (tok, (id, w)) in ids
        .chunks_exact_mut(k)
        .zip(weights.chunks_exact_mut(k))
        .enumerate()
        .take(t)
    {
        let (x, n) = (clean.row(tok), noise_logits.row(tok));
        let s = with_scratch(e, |h| {
            for (i, v) in h.iter_mut().enumerate() {
                *v = noisy_logit(x[i].to_f32(), n[i].to_f32(), noise.sample(e, tok, i));
            }
            select(h, k)
        });
        if decided(&s, id, w, &mut rep) {
            continue;
        }
        id.copy_from_slice(&s.top.idx[..k]);
        kept_softmax(&s.top, w);
    }
    Ok(rep)
}

/// How [`grouped_topk`] turns logits into scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scoring {
    /// `s = softmax(x)` over the row (warp-order sum, module docs).
    Softmax,
    /// `s = sigmoid(x)` per expert ([`crate::math::act::sigmoid`]).
    Sigmoid,
}

/// How [`grouped_topk`] scores a group of experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupScore {
    /// Sum of the group's two largest selection scores, `best + second`
    /// (DeepSeek-V3 `noaux_tc`; needs groups of at least 2 experts).
    Top2Sum,
    /// The group's largest selection score (DeepSeek-V2 group-limited).
    Max,
}

/// Parameters of [`grouped_topk`].
#[derive(Debug, Clone, Copy)]
pub struct GroupedConfig<'a> {
    /// Experts per token, `1..=min(MAX_K, topk_group * E / n_group)`.
    pub k: usize,
    /// Score function.
    pub scoring: Scoring,
    /// Per-expert correction bias `b` (`E` finite values) added to the
    /// scores for selection only (`e_score_correction_bias`); `None` for
    /// none.
    pub bias: Option<&'a [f32]>,
    /// Number of equal contiguous expert groups (`E % n_group == 0`,
    /// `1..=MAX_GROUPS`); `1` disables group limiting.
    pub n_group: usize,
    /// Groups kept per token, `1..=n_group`.
    pub topk_group: usize,
    /// Group score.
    pub group_score: GroupScore,
    /// Divide the `k` unbiased scores by their sum.
    pub renormalize: bool,
    /// Multiplies every weight (after renormalization); finite, `> 0`.
    pub routed_scaling_factor: f32,
}

impl<'a> GroupedConfig<'a> {
    /// DeepSeek-V3's router (E = 256): sigmoid scores, the given correction
    /// bias, 8 groups of 32, 4 groups kept, top-2-sum group score, k = 8,
    /// renormalized, scaled by 2.5.
    pub fn deepseek_v3(bias: &'a [f32]) -> Self {
        Self {
            k: 8,
            scoring: Scoring::Sigmoid,
            bias: Some(bias),
            n_group: 8,
            topk_group: 4,
            group_score: GroupScore::Top2Sum,
            renormalize: true,
            routed_scaling_factor: 2.5,
        }
    }

    /// Plain top-`k` over `scoring` with no groups, no bias, no scaling
    /// (`topk_sigmoid` with [`Scoring::Sigmoid`]).
    pub fn plain(k: usize, scoring: Scoring, renormalize: bool) -> Self {
        Self {
            k,
            scoring,
            bias: None,
            n_group: 1,
            topk_group: 1,
            group_score: GroupScore::Max,
            renormalize,
            routed_scaling_factor: 1.0,
        }
    }

    /// Validates the configuration for `e` experts exactly as
    /// [`grouped_topk`] does (bias length and values when given, scaling
    /// factor, groups, `k` against the kept groups) and returns the group
    /// size `e / n_group`. Exposed for callers whose logits live elsewhere
    /// (the GPU launcher).
    pub fn validate(&self, e: usize) -> Result<usize, Error> {
        self.check(e)
    }

    fn check(&self, e: usize) -> Result<usize, Error> {
        if let Some(b) = self.bias {
            ensure_len("bias", e, b.len())?;
            for (i, &v) in b.iter().enumerate() {
                ensure(
                    v.is_finite(),
                    Error::NonFinite {
                        arg: "bias",
                        index: i,
                    },
                )?;
            }
        }
        let f = self.routed_scaling_factor;
        ensure(
            f.is_finite(),
            Error::NonFinite {
                arg: "routed_scaling_factor",
                index: 0,
            },
        )?;
        ensure(
            f > 0.0,
            Error::OutOfRange {
                arg: "routed_scaling_factor",
                index: 0,
            },
        )?;
        let g = self.n_group;
        ensure(
            g > 0,
            Error::OutOfRange {
                arg: "n_group",
                index: 0,
            },
        )?;
        ensure(
            g <= MAX_GROUPS,
            Error::TooLarge {
                arg: "n_group",
                index: 0,
                max: MAX_GROUPS,
                got: g,
            },
        )?;
        ensure(
            e.is_multiple_of(g),
            Error::OutOfRange {
                arg: "n_group",
                index: 0,
            },
        )?;
        let size = e / g;
        ensure(
            self.group_score == GroupScore::Max || size >= 2,
            Error::OutOfRange {
                arg: "n_group",
                index: 0,
            },
        )?;
        ensure(
            self.topk_group > 0 && self.topk_group <= g,
            Error::OutOfRange {
                arg: "topk_group",
                index: 0,
            },
        )?;
        let reach = self.topk_group * size;
        ensure(
            self.k <= reach,
            Error::TooLarge {
                arg: "k",
                index: 0,
                max: reach,
                got: self.k,
            },
        )?;
        Ok(size)
    }
}

/// Group-limited, bias-corrected top-k routing (DeepSeek-V2/V3; vLLM's
/// `grouped_topk`, `fused_topk_bias`, `topk_sigmoid`).
///
/// Per token, with `s_e` the score ([`Scoring`]) and `s'_e = s_e + b_e` the
/// selection score (`s'_e = s_e` without bias):
///
/// 1. The experts form `n_group` contiguous groups of `E / n_group`; each
///    group is scored by [`GroupScore`] over its `s'`.
/// 2. The `topk_group` best groups are kept (ties: lower group index).
/// 3. `ids` = the top-`k` of `s'` over the kept groups' experts (ties: lower
///    expert index).
/// 4. `w_j = s_{ids_j}` (unbiased); if `renormalize`, `w_j = w_j / sum_j w_j`
///    (sequential sum; left unchanged if the sum is 0); finally
///    `w_j = w_j * routed_scaling_factor`.
///
/// NaN and fully masked rows follow the module table (a row is masked when
/// every logit is `-inf`). With [`Scoring::Softmax`], `+inf` logits follow
/// the softmax limit (`s = 1/m` on each of the `m` infinite logits).
/// Llama-4 style biased routing is `n_group = topk_group = 1` with
/// [`Scoring::Softmax`] and a bias.
///
/// Errors: the common ones (module docs, with `k = cfg.k`), plus
/// [`Error::LengthMismatch`] / [`Error::NonFinite`] (`bias`),
/// [`Error::NonFinite`] / [`Error::OutOfRange`] (`routed_scaling_factor`),
/// [`Error::OutOfRange`] (`n_group` zero, not dividing `E`, or giving groups
/// of one expert with [`GroupScore::Top2Sum`]; `topk_group` outside
/// `1..=n_group`), [`Error::TooLarge`] (`n_group` above [`MAX_GROUPS`];
/// `k` above `topk_group * E / n_group`).
///
/// ```
/// use medley_core::{Rows, moe::gating::{grouped_topk, GroupedConfig}};
/// let logits: Vec<f32> = (0..256).map(|e| ((e * 37) % 101) as f32 / 25.0 - 2.0).collect();
/// let bias = vec![0.0f32; 256];
/// let (mut ids, mut w) = ([0u32; 8], [0.0f32; 8]);
/// let cfg = GroupedConfig::deepseek_v3(&bias);
/// grouped_topk(Rows::single(&logits), &cfg, &mut ids, &mut w).unwrap();
/// let total: f32 = w.iter().sum();
/// assert!((total - 2.5).abs() < 1e-5); // renormalized, times 2.5
/// // At most 4 of the 8 groups (of 32 experts) are used.
/// let mut groups: Vec<u32> = ids.iter().map(|&e| e / 32).collect();
/// groups.sort();
/// groups.dedup();
/// assert!(groups.len() <= 4);
/// ```
pub fn grouped_topk<T: Element>(
    logits: Rows<'_, T>,
    cfg: &GroupedConfig<'_>,
    ids: &mut [u32],
    weights: &mut [f32],
) -> Result<Report, Error> {
    let k = cfg.k;
    let (e, _) = check_shape(&logits, k, ids, weights)?;
    let size = cfg.check(e)?;
    Ok(with_scratch(e, |sel| {
        grouped_rows(logits, cfg, size, sel, ids, weights)
    }))
}

/// The rows of [`grouped_topk`] after validation; `sel` is `E` scratch.
fn grouped_rows<T: Element>(
    logits: Rows<'_, T>,
    cfg: &GroupedConfig<'_>,
    size: usize,
    sel: &mut [f32],
    ids: &mut [u32],
    weights: &mut [f32],
) -> Report {
    let (k, t, n_group) = (cfg.k, logits.rows(), cfg.n_group);
    let mut rep = Report::default();
    for (tok, (id, w)) in ids
        .chunks_exact_mut(k)
        .zip(weights.chunks_exact_mut(k))
        .enumerate()
        .take(t)
    {
        let row = logits.row(tok);
        // Pass 1: NaN, max, +inf count of the logits.
        let mut nan = false;
        let mut m = f32::NEG_INFINITY;
        let mut n_inf = 0usize;
        for v in row {
            let x = v.to_f32();
            nan |= x.is_nan();
            n_inf += (x == f32::INFINITY) as usize;
            m = if x > m { x } else { m };
        }
        if nan {
            fallback(id, w, f32::NAN);
            rep.nan_rows += 1;
            continue;
        }
        if m == f32::NEG_INFINITY {
            fallback(id, w, 0.0);
            rep.masked_rows += 1;
            continue;
        }
        let sum = match cfg.scoring {
            Scoring::Softmax if m < f32::INFINITY => warp_sum_exp(row, m),
            _ => 1.0,
        };
        let inv_inf = 1.0 / n_inf as f32;
        let score = |x: f32| -> f32 {
            match cfg.scoring {
                Scoring::Sigmoid => sigmoid(x),
                Scoring::Softmax if m == f32::INFINITY => {
                    if x == f32::INFINITY {
                        inv_inf
                    } else {
                        0.0
                    }
                }
                Scoring::Softmax => exp(x - m) / sum,
            }
        };
        // Selection scores s' = s + b, once per expert.
        for (o, v) in sel.iter_mut().zip(row) {
            *o = score(v.to_f32());
        }
        if let Some(b) = cfg.bias {
            for (o, &bv) in sel.iter_mut().zip(b) {
                *o += bv;
            }
        }
        // Groups: keep the best topk_group, mask the others' experts to -inf.
        // Every selection score is finite and the kept groups hold at least
        // k experts, so the top-k of the masked row is the top-k over the
        // kept groups.
        if cfg.topk_group < n_group {
            let mut gtop = TopK::<MAX_GROUPS>::new(cfg.topk_group);
            for (g, grp) in sel.chunks_exact(size).enumerate() {
                let (mut b1, mut b2) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in grp {
                    b2 = max_fast(b2, if v < b1 { v } else { b1 });
                    b1 = max_fast(v, b1);
                }
                let gs = match cfg.group_score {
                    GroupScore::Top2Sum => b1 + b2,
                    GroupScore::Max => b1,
                };
                gtop.push(gs, g as u32);
            }
            let mut keep = [false; MAX_GROUPS];
            for &g in &gtop.idx[..gtop.len] {
                keep[g as usize] = true;
            }
            for (g, grp) in sel.chunks_exact_mut(size).enumerate() {
                if !keep[g] {
                    grp.fill(f32::NEG_INFINITY);
                }
            }
        }
        let top = select(sel, k).top;
        id.copy_from_slice(&top.idx[..k]);
        for (x, &i) in w.iter_mut().zip(&top.idx[..k]) {
            *x = score(row[i as usize].to_f32());
        }
        if cfg.renormalize {
            renorm(w);
        }
        for x in w.iter_mut() {
            *x *= cfg.routed_scaling_factor;
        }
    }
    rep
}
