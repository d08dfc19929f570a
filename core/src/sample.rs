//! Sampling the next token from a (combined) distribution, without sorting.
//!
//! An inference engine usually wants the next token, not a vocabulary-wide
//! distribution. [`sample`] picks one token per row from rows of scores
//! (log-probabilities, or any logits: every rule below is invariant to
//! adding a constant to a row); [`combine_sample`] does the same from the
//! combination of several models ([`crate::ensemble::combine`]'s
//! distribution) without the caller ever holding the combined rows.
//!
//! # Semantics (exact; the GPU kernel implements the same definition)
//!
//! For a row of scores `L_v` (the combined log-probabilities), with `L_max`
//! its maximum and `tau` the sampling temperature:
//!
//! 1. **Greedy** (`tau = 0`): the token is the argmax of `L` (lowest index
//!    among ties), whatever the filters.
//! 2. Otherwise the target distribution is `q_v ∝ exp(L_v / tau)` over the
//!    tokens with finite `L_v` (the candidates), truncated to a **kept set**
//!    `K = { v : L_v >= t }` for one threshold `t = max(t_k, t_min, t_p)`:
//!    - **top-k** (`top_k = k > 0`): `t_k` is the `k`-th largest `L_v`,
//!      counted with multiplicity (tokens tied with it are all kept, so `K`
//!      may hold more than `k` tokens); off when `k = 0` or `k >=` the number
//!      of candidates.
//!    - **min-p** (`min_p > 0`): `t_min = L_max + tau ln(min_p)`, i.e. keep
//!      `q_v >= min_p * max q`.
//!    - **top-p** (nucleus, `top_p < 1`): over the survivors `K1` of top-k
//!      and min-p, with masses `w_v = exp((L_v - L_max) / tau)` and
//!      `Z1 = sum_{K1} w_v`, `t_p` is the largest score `L_j` (j in `K1`)
//!      with `sum_{v in K1, L_v >= L_j} w_v >= top_p * Z1`: the smallest
//!      set of top tokens holding `top_p` of the renormalized mass (ties at
//!      the cut all kept).
//! 3. The token is drawn by **Gumbel-max**: the argmax over `K` of
//!    `y_v = L_v * (1 / tau) + g_v` (lowest index among ties), with
//!    `g_v = -ln(E_v)` and `E_v = -ln(u_v)` an exponential variate from the
//!    uniform `u_v = (r_v + 0.5) * 2^-24`, `r_v = word >> 8` of
//!    [`crate::rng::word`]`(seed, [row, step], v)` (Philox4x32-10, the core's
//!    one generator). The token therefore depends only on
//!    `(scores, parameters, seed, row, step)`, never on threading or on the
//!    device: the GPU kernel evaluates the same `y_v`.
//!
//! `E_v` is computed without cancellation ([`gumbel`]): for `u < 1/2` as
//! `-ln u`, for `u >= 1/2` as `-ln(1 - d)` with `d = 1 - u` exact and an odd
//! series in `d / (2 - d)`, so the large `g_v` that win the argmax keep
//! their relative precision.
//!
//! The log-probability returned with a token is `L_token`: its
//! log-probability under the combined distribution, before the sampling
//! temperature and the filters (what engines report as the token's
//! logprob).
//!
//! # Edge cases
//!
//! - A row with a NaN or `+inf` score is a NaN row: token [`NO_TOKEN`],
//!   log-probability NaN, counted in [`Report::nan_rows`].
//! - A row with no finite score (all `-inf`, or empty) is masked: token
//!   [`NO_TOKEN`], log-probability `-inf`, counted in
//!   [`Report::masked_rows`].
//! - `tau` must be finite and `>= 0`, with `1 / tau` finite;
//!   `0 < top_p <= 1`; `0 <= min_p <= 1`; any `top_k` (0 = off).
//! - A kept token whose `L_v / tau` underflows to `-inf` (a huge negative
//!   score at a tiny temperature) still takes part with `y_v = -inf`; the
//!   argmax token is always kept and always finite, so a token is always
//!   returned for a row with a candidate.
//!
//! # Cost
//!
//! No sort and no allocation: the thresholds are found by an exact radix
//! select over the scores' order-preserving 32-bit keys (3 passes of
//! 11/11/10 bits with 2048-bin histograms on the stack: counts for top-k,
//! `f64` masses for top-p), so a row costs one statistics pass, 3 passes
//! per active top-k / top-p filter, and one Gumbel pass.

use crate::element::Element;
use crate::ensemble::{self, Config, Model, NO_TOKEN};
use crate::error::{Error, ensure, ensure_len};
use crate::math::{exp, ln};
use crate::rows::Rows;
use crate::softmax::{Report, RowStatus};

/// Sampling parameters. [`Sampling::greedy`] and [`Sampling::new`] build
/// them; set the filter fields on the result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Sampling temperature `tau >= 0`; 0 is greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` highest-scoring tokens (ties at the cut kept);
    /// 0 = off.
    pub top_k: u32,
    /// Nucleus: keep the smallest top set holding this much of the
    /// (truncated, renormalized) mass; `0 < top_p <= 1`, 1 = off.
    pub top_p: f32,
    /// Keep tokens with `q_v >= min_p * max q`; `0 <= min_p <= 1`, 0 = off.
    pub min_p: f32,
    /// Generator key.
    pub seed: u64,
    /// Decoding step: with the row index, the generator's stream.
    pub step: u32,
}

impl Sampling {
    /// Greedy decoding (argmax), no filters.
    pub fn greedy() -> Self {
        Self::new(0.0, 0)
    }

    /// Temperature `tau` and `seed`, step 0, no filters.
    pub fn new(temperature: f32, seed: u64) -> Self {
        Sampling {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            step: 0,
        }
    }

    /// Validates the parameters and resolves their scalars.
    pub fn resolve(&self) -> Result<Resolved, Error> {
        let t = self.temperature;
        ensure(
            t.is_finite(),
            Error::NonFinite {
                arg: "sampling.temperature",
                index: 0,
            },
        )?;
        ensure(
            t >= 0.0,
            Error::OutOfRange {
                arg: "sampling.temperature",
                index: 0,
            },
        )?;
        let inv_t = if t == 0.0 { 0.0 } else { 1.0 / t };
        ensure(
            inv_t.is_finite(),
            Error::OutOfRange {
                arg: "sampling.temperature",
                index: 0,
            },
        )?;
        for (arg, v) in [("sampling.top_p", self.top_p), ("sampling.min_p", self.min_p)] {
            ensure(!v.is_nan(), Error::NonFinite { arg, index: 0 })?;
        }
        ensure(
            self.top_p > 0.0 && self.top_p <= 1.0,
            Error::OutOfRange {
                arg: "sampling.top_p",
                index: 0,
            },
        )?;
        ensure(
            (0.0..=1.0).contains(&self.min_p),
            Error::OutOfRange {
                arg: "sampling.min_p",
                index: 0,
            },
        )?;
        Ok(Resolved {
            greedy: t == 0.0,
            temperature: t,
            inv_t,
            top_k: self.top_k,
            top_p: self.top_p,
            // tau ln(min_p): -inf for min_p = 0 (off)
            min_p_shift: if self.min_p > 0.0 && t > 0.0 {
                t * ln(self.min_p)
            } else {
                f32::NEG_INFINITY
            },
            seed: self.seed,
            step: self.step,
        })
    }
}

/// Validated sampling scalars, from [`Sampling::resolve`] (what a GPU
/// launcher passes to its kernel).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    /// `tau = 0`.
    pub greedy: bool,
    /// `tau`.
    pub temperature: f32,
    /// `1 / tau` (0 when greedy).
    pub inv_t: f32,
    /// `top_k` (0 = off).
    pub top_k: u32,
    /// `top_p` (1 = off).
    pub top_p: f32,
    /// `tau ln(min_p)`, `-inf` when min-p is off.
    pub min_p_shift: f32,
    /// Generator key.
    pub seed: u64,
    /// Decoding step.
    pub step: u32,
}

/// Where [`sample`] and [`combine_sample`] write, one entry per row.
#[derive(Debug)]
pub struct Sampled<'o> {
    /// The token per row ([`NO_TOKEN`] for masked and NaN rows).
    pub tokens: &'o mut [u32],
    /// Optionally, the token's score `L_token` (its log-probability under
    /// the combined distribution; `-inf` for masked rows, NaN for NaN rows).
    pub log_probs: Option<&'o mut [f32]>,
}

/// The Gumbel variate `g = -ln(-ln u)` of a random word, `u = ((word >>
/// 8) + 0.5) 2^-24` (see the module notes for how `-ln u` keeps its
/// precision near `u = 1`). Always finite: `|g| < 18`.
#[inline]
pub fn gumbel(word: u32) -> f32 {
    let r = word >> 8;
    let e = if r < (1 << 23) {
        let u = (r as f32 + 0.5) * (1.0 / 16_777_216.0);
        -ln(u)
    } else {
        // d = 1 - u, exact: (2^24 - r - 0.5) 2^-24 in (0, 1/2]
        let d = ((16_777_216 - r) as f32 - 0.5) * (1.0 / 16_777_216.0);
        neg_ln_1m(d)
    };
    -ln(e)
}

/// `-ln(1 - d)` for `d` in `(0, 1/2]`: `2 atanh(s)`, `s = d / (2 - d)` in
/// `(0, 1/3]`, by its odd series to `s^15` (relative error below 1e-8).
#[inline]
pub fn neg_ln_1m(d: f32) -> f32 {
    let s = d / (2.0 - d);
    let z = s * s;
    let mut p = 1.0f32 / 15.0;
    p = p * z + 1.0 / 13.0;
    p = p * z + 1.0 / 11.0;
    p = p * z + 1.0 / 9.0;
    p = p * z + 1.0 / 7.0;
    p = p * z + 1.0 / 5.0;
    p = p * z + 1.0 / 3.0;
    p = p * z + 1.0;
    2.0 * s * p
}

/// The order-preserving 32-bit key of a non-NaN score (`-0` maps as `+0`).
#[inline(always)]
pub fn score_key(x: f32) -> u32 {
    let b = (x + 0.0).to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// The score of a key (inverse of [`score_key`]).
#[inline(always)]
pub fn key_score(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7FFF_FFFF } else { !k })
}

/// Radix digits, most significant first: (shift, bits).
const DIGITS: [(u32, u32); 3] = [(21, 11), (10, 11), (0, 10)];
const BINS: usize = 1 << 11;

/// What a threshold select accumulates.
#[derive(Clone, Copy)]
enum Select {
    /// Counts; reach `k` tokens.
    TopK(u32),
    /// Masses `exp((L - L_max) inv_t)`; reach `top_p` of the total.
    TopP { top_p: f32, l_max: f32, inv_t: f32 },
}

/// The largest key `t >= floor` such that the weight of the candidates
/// with key in `[t, inf)` (and `>= floor`) reaches the target. Exact radix
/// select, 3 passes over `row`.
fn select_key<T: Element>(row: &[T], floor: u32, sel: Select) -> u32 {
    let mut prefix = 0u32;
    let mut above = 0.0f64; // weight of the keys above the current prefix range
    let mut target = match sel {
        Select::TopK(k) => k as f64,
        Select::TopP { .. } => 0.0, // from pass 0's total
    };
    let mut hist = [0.0f64; BINS];
    for (pass, &(shift, bits)) in DIGITS.iter().enumerate() {
        hist.iter_mut().for_each(|h| *h = 0.0);
        let hi = shift + bits;
        let mask = (1u32 << bits) - 1;
        for x in row.iter().map(|x| x.to_f32()) {
            // candidates only (finite); NaN rows never get here
            if x == f32::NEG_INFINITY {
                continue;
            }
            let k = score_key(x);
            if k < floor || (pass > 0 && (k >> hi) != (prefix >> hi)) {
                continue;
            }
            let w = match sel {
                Select::TopK(_) => 1.0,
                Select::TopP { l_max, inv_t, .. } => exp((x - l_max) * inv_t) as f64,
            };
            hist[((k >> shift) & mask) as usize] += w;
        }
        if pass == 0
            && let Select::TopP { top_p, .. } = sel
        {
            let total: f64 = hist.iter().sum();
            target = top_p as f64 * total;
        }
        let mut cum = above;
        let mut chosen = 0u32;
        for b in (0..=mask as usize).rev() {
            let c = cum + hist[b];
            if c >= target && hist[b] > 0.0 {
                chosen = b as u32;
                break;
            }
            cum = c;
        }
        above = cum;
        prefix |= chosen << shift;
    }
    prefix
}

/// Samples one row of scores (see the module notes). Returns the token and
/// the row's status.
fn sample_row<T: Element>(row: &[T], p: &Resolved, row_id: u32) -> (u32, f32, RowStatus) {
    // statistics: NaN / +inf, max, argmax, candidates
    let mut l_max = f32::NEG_INFINITY;
    let mut arg = NO_TOKEN;
    let mut n = 0usize;
    for (v, x) in row.iter().map(|x| x.to_f32()).enumerate() {
        if x.is_nan() || x == f32::INFINITY {
            return (NO_TOKEN, f32::NAN, RowStatus::Nan);
        }
        if x == f32::NEG_INFINITY {
            continue;
        }
        n += 1;
        if x > l_max {
            l_max = x;
            arg = v as u32;
        }
    }
    if n == 0 {
        return (NO_TOKEN, f32::NEG_INFINITY, RowStatus::Masked);
    }
    if p.greedy {
        return (arg, l_max, RowStatus::Ok);
    }
    // thresholds, as keys
    let mut floor = score_key(l_max + p.min_p_shift).max(score_key(f32::MIN));
    if p.min_p_shift == f32::NEG_INFINITY {
        floor = 0;
    }
    if p.top_k > 0 && (p.top_k as usize) < n {
        floor = floor.max(select_key(row, 0, Select::TopK(p.top_k)));
    }
    if p.top_p < 1.0 {
        floor = floor.max(select_key(
            row,
            floor,
            Select::TopP {
                top_p: p.top_p,
                l_max,
                inv_t: p.inv_t,
            },
        ));
    }
    // Gumbel-max over the kept set
    let stream = [row_id, p.step];
    let mut best = f32::NEG_INFINITY;
    let mut tok = arg;
    let mut lp = l_max;
    for (v, x) in row.iter().map(|x| x.to_f32()).enumerate() {
        if x == f32::NEG_INFINITY || score_key(x) < floor {
            continue;
        }
        let y = x * p.inv_t + gumbel(crate::rng::word(p.seed, stream, v as u64));
        if y > best {
            best = y;
            tok = v as u32;
            lp = x;
        }
    }
    (tok, lp, RowStatus::Ok)
}

fn check_out(rows: usize, vocab: usize, out: &Sampled<'_>) -> Result<(), Error> {
    ensure_len("tokens", rows, out.tokens.len())?;
    if let Some(l) = &out.log_probs {
        ensure_len("log_probs", rows, l.len())?;
    }
    ensure(
        vocab <= u32::MAX as usize,
        Error::TooLarge {
            arg: "vocab",
            index: 0,
            max: u32::MAX as usize,
            got: vocab,
        },
    )
}

/// Samples one token per row of `scores` (log-probabilities or logits,
/// any element type).
///
/// Row `b` uses the generator stream `[b, params.step]` under
/// `params.seed`. Errors (nothing written): invalid parameters, output
/// lengths that differ from the row count, rows longer than `u32` ids.
///
/// ```
/// use medley_core::{Rows, sample::{sample, Sampled, Sampling}};
/// let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
/// let mut tok = [0u32];
/// let mut lp = [0.0f32];
/// // greedy
/// sample(Rows::single(&logits), &Sampling::greedy(), Sampled { tokens: &mut tok, log_probs: None }).unwrap();
/// assert_eq!(tok[0], 1);
/// // top-k 2 at temperature 1: token 1 or 2, never 0 or the masked 3
/// let mut s = Sampling::new(1.0, 42);
/// s.top_k = 2;
/// for step in 0..32 {
///     s.step = step;
///     sample(Rows::single(&logits), &s, Sampled { tokens: &mut tok, log_probs: Some(&mut lp) }).unwrap();
///     assert!(tok[0] == 1 || tok[0] == 2);
///     assert_eq!(lp[0], logits[tok[0] as usize]);
/// }
/// ```
pub fn sample<T: Element>(scores: Rows<'_, T>, params: &Sampling, out: Sampled<'_>) -> Result<Report, Error> {
    let p = params.resolve()?;
    check_out(scores.rows(), scores.len(), &out)?;
    let mut report = Report::default();
    let Sampled {
        tokens,
        mut log_probs,
    } = out;
    for b in 0..scores.rows() {
        let (tok, lp, st) = sample_row(scores.row(b), &p, b as u32);
        report.add(st);
        tokens[b] = tok;
        if let Some(l) = log_probs.as_deref_mut() {
            l[b] = lp;
        }
    }
    Ok(report)
}

/// Combines `models` as [`crate::ensemble::combine`] does with `cfg` and
/// samples one token per row from the combined distribution, without
/// returning the combined rows: `scratch` (at least `vocab` floats, reused
/// row after row) holds one combined row at a time.
///
/// `rows` is `out.tokens.len()`. Errors: those of
/// [`crate::ensemble::combine`] for `rows x vocab` outputs, invalid sampling
/// parameters, a `scratch` shorter than `vocab`, a `log_probs` output of
/// another length; nothing is written on error.
///
/// ```
/// use medley_core::{Rows, ensemble::{Config, Model}, sample::{combine_sample, Sampled, Sampling}};
/// // Contrastive pair: expert minus half the amateur.
/// let expert = [2.0f32, 1.9, 0.0];
/// let amateur = [2.0f32, 0.0, 0.0];
/// let models = [Model::new(Rows::single(&expert)), Model::new(Rows::single(&amateur))];
/// let coef = [1.0f32, -0.5];
/// let mut scratch = [0.0f32; 3];
/// let mut tok = [0u32];
/// let out = Sampled { tokens: &mut tok, log_probs: None };
/// combine_sample(&models, &Config::log_linear(&coef), &Sampling::greedy(), 3, &mut scratch, out).unwrap();
/// assert_eq!(tok[0], 1); // 1.9 beats 2.0 - 1.0
/// ```
pub fn combine_sample(
    models: &[Model<'_>],
    cfg: &Config<'_>,
    params: &Sampling,
    vocab: usize,
    scratch: &mut [f32],
    out: Sampled<'_>,
) -> Result<Report, Error> {
    let p = params.resolve()?;
    let rows = out.tokens.len();
    check_out(rows, vocab, &out)?;
    ensure(
        scratch.len() >= vocab,
        Error::BufferTooShort {
            arg: "scratch",
            needed: vocab,
            got: scratch.len(),
        },
    )?;
    let row = &mut scratch[..vocab];
    let plan = ensemble::Plan::new(models, cfg, rows, vocab)?;
    let mut s = ensemble::Scratch::new();
    let mut report = Report::default();
    let Sampled {
        tokens,
        mut log_probs,
    } = out;
    for b in 0..rows {
        let r = ensemble::combine_row(&plan, b, row, &mut s);
        let (tok, lp, st) = match r.status {
            RowStatus::Ok => sample_row(row, &p, b as u32),
            RowStatus::Masked => (NO_TOKEN, f32::NEG_INFINITY, RowStatus::Masked),
            RowStatus::Nan => (NO_TOKEN, f32::NAN, RowStatus::Nan),
        };
        report.add(st);
        tokens[b] = tok;
        if let Some(l) = log_probs.as_deref_mut() {
            l[b] = lp;
        }
    }
    Ok(report)
}
