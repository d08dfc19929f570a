//! Combining the next-token distributions of several models.
//!
//! `M` models give logits `z_m` for the same `B` rows over a shared
//! vocabulary of `V` tokens (model `m` may cover only its first `V_m <= V`
//! tokens, with its own row stride and element type). [`combine`] writes one
//! distribution per row, as `f32` log-probabilities and/or probabilities, plus
//! optional per-row argmax and log-normalizer.
//!
//! # Modes
//!
//! With `T_m` the per-model temperature, `P_m = softmax(z_m / T_m)` and
//! `T_out` the output temperature:
//!
//! - [`Mode::Linear`] ("logical OR"): `P ∝ (sum_m w_m P_m)^(1/T_out)`, with
//!   `w_m >= 0`. Computed in log space as
//!   `ln P(v) = LSE_m(ln(w_m / W) + z_m(v)/T_m - lse_m)` with `W = sum_m w_m`,
//!   so a model assigning probability 0 to a token (or a token far in a
//!   model's tail) is exact: the token keeps the mass the other models give
//!   it. The weights are normalized by `W`; [`Output::log_normalizer`]
//!   returns the mass, so `ln sum_m w_m P_m(v)` is `log_prob + log_normalizer`
//!   when `T_out = 1`. A model whose row is fully masked has no distribution
//!   for that row: it leaves the mixture and its weight does not count in
//!   `W` ([`MaskRule::All`]), or it masks the whole row ([`MaskRule::Any`]).
//! - [`Mode::LogLinear`] ("logical AND", product of experts):
//!   `P = softmax_v(sum_m c_m z_m)` with `c_m = lambda_m / (T_m T_out)` and
//!   signed, unnormalized `lambda_m`. Per-model normalizers are constant
//!   along the vocabulary and cancel, so raw logits suffice. Negative
//!   coefficients give DExperts (`z_base + a (z_expert - z_anti)`),
//!   contrastive decoding (`lambda = (1, -beta)`) or classifier-free guidance
//!   (`(g, 1 - g)`). "Averaging logits" is log-linear with `lambda_m = 1/M`.
//!
//! Weights are per model ([`Weights::PerModel`]) or per row
//! ([`Weights::PerRow`], a `B x M` table, for context-dependent interpolation
//! from a router). A model whose weight (coefficient) is zero for a row is
//! skipped: its logits are not read for that row.
//!
//! # Masks and edge cases
//!
//! - Tokens `v >= V_m` are `-inf` for model `m` (probability 0).
//! - Log-linear: a token that is `-inf` in any model with a nonzero
//!   coefficient is `-inf` in the output, whatever the sign of the coefficient
//!   (never `0 * inf`, never `inf - inf`).
//! - Linear: by default ([`MaskRule::All`]) a token is `-inf` in the output
//!   only when every model with nonzero weight gives it `-inf` (probability 0
//!   in all of them): that is what a mixture means. [`MaskRule::Any`] treats
//!   `-inf` as a hard constraint from any model; the output is renormalized
//!   over the surviving tokens.
//! - Plausibility (contrastive decoding's `alpha`): with
//!   [`Plausibility { model: j, alpha }`](Plausibility), only tokens with
//!   `P_j(v) >= alpha * max_v P_j(v)` are kept (`P_j` at model `j`'s
//!   temperature); the rest are `-inf` and the output is renormalized over
//!   the kept set. Model `j` is read even if its weight is zero. `alpha = 0`
//!   keeps every token; if model `j`'s row is fully masked nothing is kept.
//! - A fully masked row (no token survives) gets log-probabilities `-inf`,
//!   probabilities 0, log-normalizer `-inf`, argmax [`NO_TOKEN`], and is
//!   counted in [`Report::masked_rows`].
//! - A NaN or `+inf` logit read from a model used for the row (or a combined
//!   score that overflows `f32`) makes the whole row NaN (argmax
//!   [`NO_TOKEN`]), counted in [`Report::nan_rows`]. Logits are not
//!   silently cleaned: a NaN is an upstream bug.
//! - Log-linear rows with every coefficient zero are uniform over the tokens
//!   the plausibility mask keeps (over all `V` without one).
//!
//! # Per-row uncertainty
//!
//! [`Output`] can also report, per row, how sure the combined distribution
//! is ("models tend to be more uncertain when they are about to make
//! errors", which is what cascades and selective prediction exploit):
//!
//! - [`Output::entropy`]: `H(P) = -sum_v P(v) ln P(v)` in nats, of the output
//!   distribution (after `T_out` and every mask); `0` for a one-hot row,
//!   `ln n` for a uniform row over `n` tokens.
//! - [`Output::top1_prob`]: `max_v P(v)`.
//! - [`Output::margin`]: top-1 minus top-2 probability, the second counted
//!   with multiplicity (two tokens tied at the top give `0`; a row with one
//!   token of nonzero probability gives the top-1 probability).
//! - [`Output::disagreement`] (linear mode only, [`Error::Unsupported`]
//!   in log-linear mode): `H(sum_m w_m P_m) - sum_m w_m H(P_m)` over the
//!   models live in the row (nonzero weight, row not fully masked), with
//!   the weights normalized over them and each `P_m = softmax(z_m / T_m)` on
//!   its own `V_m` tokens. It is the generalized Jensen-Shannon divergence of
//!   the members, i.e. the mutual information between the token and which
//!   model produced it: `0` when the models agree, at most `ln M`. It
//!   describes the members, so it is taken before `T_out`, the
//!   [`MaskRule::Any`] masks and the plausibility mask, and clamped at 0
//!   against rounding.
//!
//! They are fused into the combination's passes (the entropies ride on the
//! online log-sum-exp statistics, as `ln S - sum e^y y / S`, with no extra
//! exponential per token; top-1/top-2 are one compare pass over the written
//! row, like the argmax). Rows that are fully masked or NaN get NaN in all
//! four outputs: they have no distribution, and a cascade
//! ([`crate::cascade::defer`]) escalates them.
//!
//! All arithmetic is `f32` with stable (max-shifted) exponentials. A call
//! that returns `Err` writes nothing.

use crate::element::{Element, widen};
use crate::error::{Error, ensure, ensure_len, ensure_len_at};
use crate::math::{exp, exp_nonpos, ln, ln_pos, max_fast};
use crate::rowops::{
    LANES, Online, TILE, argmax, exp_shift_inplace, exp_shift_into, exp_shift_store, ln_inplace_ent,
    max_and_bad, pairwise_sum, row_online, sum_exp_ent, sum_exp_shifted, top2,
};
use crate::rows::{Rows, RowsMut};
use crate::softmax::{Report, RowStatus, inv_temperature, log_softmax_row_inplace_ent};
use half::{bf16, f16};

/// Most models one call combines.
pub const MAX_MODELS: usize = 64;

/// Argmax value of a row with no valid token (fully masked or NaN).
pub const NO_TOKEN: u32 = u32::MAX;

/// One model's logits, of any supported element type.
#[derive(Debug, Clone, Copy)]
pub enum Logits<'a> {
    /// `f32` logits.
    F32(Rows<'a, f32>),
    /// `f16` logits.
    F16(Rows<'a, f16>),
    /// `bf16` logits.
    BF16(Rows<'a, bf16>),
}

impl<'a> From<Rows<'a, f32>> for Logits<'a> {
    fn from(r: Rows<'a, f32>) -> Self {
        Logits::F32(r)
    }
}
impl<'a> From<Rows<'a, f16>> for Logits<'a> {
    fn from(r: Rows<'a, f16>) -> Self {
        Logits::F16(r)
    }
}
impl<'a> From<Rows<'a, bf16>> for Logits<'a> {
    fn from(r: Rows<'a, bf16>) -> Self {
        Logits::BF16(r)
    }
}

impl<'a> Logits<'a> {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        match self {
            Logits::F32(r) => r.rows(),
            Logits::F16(r) => r.rows(),
            Logits::BF16(r) => r.rows(),
        }
    }

    /// Valid vocabulary length of this model (its row length).
    pub fn len(&self) -> usize {
        match self {
            Logits::F32(r) => r.len(),
            Logits::F16(r) => r.len(),
            Logits::BF16(r) => r.len(),
        }
    }

    /// True if the model has no rows or an empty vocabulary.
    pub fn is_empty(&self) -> bool {
        self.rows() == 0 || self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> crate::DType {
        match self {
            Logits::F32(_) => crate::DType::F32,
            Logits::F16(_) => crate::DType::F16,
            Logits::BF16(_) => crate::DType::BF16,
        }
    }

    /// Elements `lo..hi` of row `b` as `f32`: borrowed for `f32` input,
    /// widened into `buf` otherwise.
    #[inline(always)]
    pub(crate) fn tile<'s>(&'s self, b: usize, lo: usize, hi: usize, buf: &'s mut [f32]) -> &'s [f32] {
        #[inline(always)]
        fn w<'s, T: Element>(r: &[T], buf: &'s mut [f32]) -> &'s [f32] {
            let t = &mut buf[..r.len()];
            widen(r, t);
            t
        }
        match self {
            Logits::F32(r) => &r.row(b)[lo..hi],
            Logits::F16(r) => w(&r.row(b)[lo..hi], buf),
            Logits::BF16(r) => w(&r.row(b)[lo..hi], buf),
        }
    }

    /// Maximum of row `b` (NaN-blind) and whether it holds NaN or `+inf`.
    #[inline(always)]
    pub(crate) fn max_bad(&self, b: usize, tile: &mut [f32; TILE]) -> (f32, bool) {
        let (mut m, mut bad) = (f32::NEG_INFINITY, false);
        let len = self.len();
        let mut lo = 0;
        while lo < len {
            let hi = (lo + TILE).min(len);
            let (tm, tb) = max_and_bad(self.tile(b, lo, hi, tile));
            m = max_fast(tm, m);
            bad |= tb;
            lo = hi;
        }
        (m, bad)
    }

    /// `sum_v exp((z_v - max) * inv_t)` over row `b`; when `store` is given,
    /// also writes each term there (its first `len()` entries).
    #[inline(always)]
    pub(crate) fn sum_exp(
        &self,
        b: usize,
        max: f32,
        inv_t: f32,
        mut store: Option<&mut [f32]>,
        tile: &mut [f32; TILE],
    ) -> f32 {
        let len = self.len();
        let mut sum = 0.0f32;
        let mut lo = 0;
        while lo < len {
            let hi = (lo + TILE).min(len);
            let z = self.tile(b, lo, hi, tile);
            sum += match store.as_deref_mut() {
                Some(st) => exp_shift_store(z, max, inv_t, &mut st[lo..hi]),
                None => sum_exp_shifted(z, max, inv_t),
            };
            lo = hi;
        }
        sum
    }

    /// [`Logits::sum_exp`] that also returns `sum_v e_v y_v` with
    /// `y_v = (z_v - max) * inv_t`, `e_v = exp(y_v)` (the entropy term).
    #[inline(always)]
    pub(crate) fn sum_exp_ent(
        &self,
        b: usize,
        max: f32,
        inv_t: f32,
        mut store: Option<&mut [f32]>,
        tile: &mut [f32; TILE],
    ) -> (f32, f32) {
        let len = self.len();
        let (mut sum, mut ent) = (0.0f32, 0.0f32);
        let mut lo = 0;
        while lo < len {
            let hi = (lo + TILE).min(len);
            let z = self.tile(b, lo, hi, tile);
            let (s, h) = sum_exp_ent(z, max, inv_t, store.as_deref_mut().map(|st| &mut st[lo..hi]));
            sum += s;
            ent += h;
            lo = hi;
        }
        (sum, ent)
    }

    /// Online (max, sum) statistics of row `b` at `1/inv_t`.
    #[inline(always)]
    pub(crate) fn online(&self, b: usize, inv_t: f32, tile: &mut [f32; TILE]) -> Online {
        match self {
            Logits::F32(r) => row_online(r.row(b), inv_t, tile),
            Logits::F16(r) => row_online(r.row(b), inv_t, tile),
            Logits::BF16(r) => row_online(r.row(b), inv_t, tile),
        }
    }
}

/// One input of a combination: logits and a temperature.
#[derive(Debug, Clone, Copy)]
pub struct Model<'a> {
    /// `B` rows of this model's logits (row length `V_m <= V`).
    pub logits: Logits<'a>,
    /// Temperature `T_m > 0` applied to this model's logits.
    pub temperature: f32,
}

impl<'a> Model<'a> {
    /// A model at temperature 1.
    pub fn new(logits: impl Into<Logits<'a>>) -> Self {
        Self {
            logits: logits.into(),
            temperature: 1.0,
        }
    }

    /// The same model at temperature `t`.
    pub fn with_temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }
}

/// How the models combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Mixture of distributions, `sum_m w_m P_m` ("logical OR"); weights are
    /// `>= 0` and normalized by their sum.
    Linear,
    /// Product of experts, `softmax(sum_m lambda_m z_m / T_m)` ("logical
    /// AND"); coefficients are signed and not normalized.
    LogLinear,
}

/// Which `-inf` logits mask a token in linear mode (log-linear mode always
/// uses [`MaskRule::Any`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskRule {
    /// A token is masked when every model with nonzero weight masks it.
    #[default]
    All,
    /// A token is masked when any model with nonzero weight masks it.
    Any,
}

/// Model weights (linear) or coefficients (log-linear).
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// One value per model (`M` values).
    PerModel(&'a [f32]),
    /// One row of `M` values per output row (`B x M`, any row stride).
    PerRow(Rows<'a, f32>),
}

/// Contrastive decoding's plausibility constraint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plausibility {
    /// The model whose distribution decides plausibility.
    pub model: usize,
    /// Keep tokens with `P_model(v) >= alpha * max P_model`; `0 <= alpha <= 1`.
    pub alpha: f32,
}

/// Parameters of a combination.
#[derive(Debug, Clone, Copy)]
pub struct Config<'a> {
    /// Linear or log-linear.
    pub mode: Mode,
    /// Weights or coefficients.
    pub weights: Weights<'a>,
    /// Output temperature `T_out > 0` (1 for none).
    pub out_temperature: f32,
    /// Optional plausibility mask.
    pub plausibility: Option<Plausibility>,
    /// Masking rule in linear mode.
    pub mask_rule: MaskRule,
}

impl<'a> Config<'a> {
    /// Linear interpolation with per-model weights, `T_out = 1`, no mask.
    pub fn linear(weights: &'a [f32]) -> Self {
        Self {
            mode: Mode::Linear,
            weights: Weights::PerModel(weights),
            out_temperature: 1.0,
            plausibility: None,
            mask_rule: MaskRule::All,
        }
    }

    /// Log-linear combination with per-model coefficients, `T_out = 1`, no mask.
    pub fn log_linear(coefficients: &'a [f32]) -> Self {
        Self {
            mode: Mode::LogLinear,
            ..Self::linear(coefficients)
        }
    }
}

/// Where a combination writes. At least one of `log_probs` and `probs` must
/// be given; each given output has one entry (row) per output row.
#[derive(Debug, Default)]
pub struct Output<'o> {
    /// `B x V` log-probabilities.
    pub log_probs: Option<RowsMut<'o, f32>>,
    /// `B x V` probabilities.
    pub probs: Option<RowsMut<'o, f32>>,
    /// Per row, the token with the highest probability (lowest index among
    /// ties); [`NO_TOKEN`] for masked and NaN rows.
    pub argmax: Option<&'o mut [u32]>,
    /// Per row, `ln Z` of the row: `log_probs = u - ln Z` with `u` the
    /// unnormalized log-score. Log-linear: `u_v = sum_m c_m z_m(v)` over kept
    /// tokens. Linear: `u_v = ln(sum_m w_m P_m(v)) / T_out` over kept tokens
    /// (so with `T_out = 1` and nothing masked, `ln Z = ln sum_m w_m`).
    pub log_normalizer: Option<&'o mut [f32]>,
    /// Per row, the entropy `H(P) = -sum_v P(v) ln P(v)` (nats) of the
    /// output distribution (after `T_out` and every mask). See
    /// [Uncertainty](self#per-row-uncertainty).
    pub entropy: Option<&'o mut [f32]>,
    /// Per row, the top-1 probability `max_v P(v)`.
    pub top1_prob: Option<&'o mut [f32]>,
    /// Per row, the top-1 minus top-2 probability (`0` when two tokens tie at
    /// the top; the top-1 probability when only one token has mass).
    pub margin: Option<&'o mut [f32]>,
    /// Per row, the models' disagreement (linear mode only): the
    /// generalized Jensen-Shannon divergence `H(sum_m w_m P_m) - sum_m w_m
    /// H(P_m)` of the live models' own distributions (normalized weights),
    /// before `T_out` and the masks; the mutual information between the
    /// token and the model index, what the ensemble adds over its members.
    pub disagreement: Option<&'o mut [f32]>,
}

impl Output<'_> {
    /// Whether any per-row uncertainty output is asked for.
    fn wants_uncertainty(&self) -> bool {
        self.entropy.is_some()
            || self.top1_prob.is_some()
            || self.margin.is_some()
            || self.disagreement.is_some()
    }
}

/// Validated, resolved parameters.
pub(crate) struct Plan<'c, 'a> {
    models: &'c [Model<'a>],
    mode: Mode,
    weights: Weights<'c>,
    inv_t: [f32; MAX_MODELS],
    inv_t_out: f32,
    /// (model, ln alpha)
    plaus: Option<(usize, f32)>,
    mask_any: bool,
    vocab: usize,
    /// Compute the output entropy (and, linear, the mixture entropy).
    want_entropy: bool,
    /// Compute the per-model entropies for the disagreement (linear).
    want_js: bool,
    /// Track the two largest log-probabilities (top-1, margin).
    want_top: bool,
}

/// Shape of one model's logits and its temperature: what validating a
/// combination needs when the logits themselves live elsewhere (on a GPU).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    /// Rows of logits.
    pub rows: usize,
    /// Valid vocabulary length `V_m`.
    pub len: usize,
    /// Temperature `T_m`.
    pub temperature: f32,
}

/// A validated combination's resolved scalars, from [`resolve`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    /// `1 / T_m` per model (first `M` entries).
    pub inv_t: [f32; MAX_MODELS],
    /// `1 / T_out`.
    pub inv_t_out: f32,
    /// Plausibility model and `ln alpha` (`-inf` for `alpha = 0`).
    pub plausibility: Option<(usize, f32)>,
    /// Whether any active `-inf` masks a token (log-linear, or
    /// [`MaskRule::Any`]).
    pub mask_any: bool,
}

/// Validates a combination of models of the given shapes into `rows x
/// vocab` outputs, exactly as [`combine`] does before reading any logit,
/// and returns the resolved scalars. Same errors as [`combine`] (except the
/// output checks, which belong to the caller).
pub fn resolve(
    models: &[ModelShape],
    cfg: &Config<'_>,
    rows: usize,
    vocab: usize,
) -> Result<Resolved, Error> {
    let m_count = models.len();
    ensure(m_count > 0, Error::Empty { arg: "models" })?;
    ensure(
        m_count <= MAX_MODELS,
        Error::TooLarge {
            arg: "models",
            index: 0,
            max: MAX_MODELS,
            got: m_count,
        },
    )?;
    let mut inv_t = [0.0f32; MAX_MODELS];
    for (i, md) in models.iter().enumerate() {
        ensure_len_at("models.logits.rows", i, rows, md.rows)?;
        let v = md.len;
        ensure(
            v <= vocab,
            Error::TooLarge {
                arg: "models.logits.len",
                index: i,
                max: vocab,
                got: v,
            },
        )?;
        inv_t[i] = inv_temperature("models.temperature", i, md.temperature)?;
    }
    let inv_t_out = inv_temperature("out_temperature", 0, cfg.out_temperature)?;
    let plaus = match cfg.plausibility {
        None => None,
        Some(p) => {
            ensure(
                p.model < m_count,
                Error::IndexOutOfBounds {
                    arg: "plausibility.model",
                    index: p.model,
                    bound: m_count,
                },
            )?;
            ensure(
                !p.alpha.is_nan(),
                Error::NonFinite {
                    arg: "plausibility.alpha",
                    index: 0,
                },
            )?;
            ensure(
                (0.0..=1.0).contains(&p.alpha),
                Error::OutOfRange {
                    arg: "plausibility.alpha",
                    index: 0,
                },
            )?;
            Some((p.model, ln(p.alpha)))
        }
    };
    // Weights: shape, finiteness, sign (linear), coefficient range.
    let check_row = |ws: &[f32], row: usize| -> Result<(), Error> {
        let mut sum = 0.0f32;
        for (i, &w) in ws.iter().enumerate() {
            let flat = row * m_count + i;
            ensure(
                w.is_finite(),
                Error::NonFinite {
                    arg: "weights",
                    index: flat,
                },
            )?;
            match cfg.mode {
                Mode::Linear => {
                    ensure(
                        w >= 0.0,
                        Error::OutOfRange {
                            arg: "weights",
                            index: flat,
                        },
                    )?;
                    sum += w;
                }
                Mode::LogLinear => {
                    let c = w * inv_t[i] * inv_t_out;
                    ensure(
                        c.is_finite(),
                        Error::OutOfRange {
                            arg: "weights",
                            index: flat,
                        },
                    )?;
                }
            }
        }
        if cfg.mode == Mode::Linear {
            ensure(
                sum > 0.0,
                Error::ZeroSum {
                    arg: "weights",
                    index: row,
                },
            )?;
            ensure(
                sum.is_finite(),
                Error::OutOfRange {
                    arg: "weights",
                    index: row,
                },
            )?;
        }
        Ok(())
    };
    match cfg.weights {
        Weights::PerModel(ws) => {
            ensure_len("weights", m_count, ws.len())?;
            check_row(ws, 0)?;
        }
        Weights::PerRow(t) => {
            ensure_len("weights.rows", rows, t.rows())?;
            ensure_len("weights.len", m_count, t.len())?;
            for b in 0..rows {
                check_row(t.row(b), b)?;
            }
        }
    }
    Ok(Resolved {
        inv_t,
        inv_t_out,
        plausibility: plaus,
        mask_any: cfg.mode == Mode::LogLinear || cfg.mask_rule == MaskRule::Any,
    })
}

/// One active model of a row: its index and coefficient (log-linear) or
/// weight (linear).
#[derive(Clone, Copy, Default)]
struct Active {
    m: usize,
    w: f32,
}

impl<'c, 'a> Plan<'c, 'a> {
    pub(crate) fn new(
        models: &'c [Model<'a>],
        cfg: &Config<'c>,
        rows: usize,
        vocab: usize,
    ) -> Result<Self, Error> {
        ensure(
            models.len() <= MAX_MODELS,
            Error::TooLarge {
                arg: "models",
                index: 0,
                max: MAX_MODELS,
                got: models.len(),
            },
        )?;
        let mut shapes = [ModelShape {
            rows: 0,
            len: 0,
            temperature: 1.0,
        }; MAX_MODELS];
        for (s, m) in shapes.iter_mut().zip(models) {
            *s = ModelShape {
                rows: m.logits.rows(),
                len: m.logits.len(),
                temperature: m.temperature,
            };
        }
        let r = resolve(&shapes[..models.len()], cfg, rows, vocab)?;
        Ok(Plan {
            models,
            mode: cfg.mode,
            weights: cfg.weights,
            inv_t: r.inv_t,
            inv_t_out: r.inv_t_out,
            plaus: r.plausibility,
            mask_any: r.mask_any,
            vocab,
            want_entropy: false,
            want_js: false,
            want_top: false,
        })
    }

    /// The models used by row `b` (nonzero weight), with their resolved
    /// coefficient (log-linear) or weight (linear). Returns the count and,
    /// for linear, the weight sum.
    fn active(&self, b: usize, out: &mut [Active; MAX_MODELS]) -> (usize, f32) {
        let ws = match self.weights {
            Weights::PerModel(ws) => ws,
            Weights::PerRow(t) => t.row(b),
        };
        let mut n = 0;
        let mut sum = 0.0f32;
        for (m, &w) in ws.iter().enumerate() {
            let w = match self.mode {
                Mode::Linear => {
                    sum += w;
                    w
                }
                // A coefficient that underflows to 0 once scaled is skipped
                // too (never 0 * inf).
                Mode::LogLinear => w * self.inv_t[m] * self.inv_t_out,
            };
            if w == 0.0 {
                continue;
            }
            out[n] = Active { m, w };
            n += 1;
        }
        (n, sum)
    }
}

/// Per-row result of the row engine.
#[derive(Clone, Copy)]
pub(crate) struct RowOut {
    pub(crate) status: RowStatus,
    pub(crate) log_z: f32,
    /// Output entropy (when the plan wants it; NaN for rows not Ok).
    pub(crate) entropy: f32,
    /// Disagreement (linear, when the plan wants it; NaN for rows not Ok).
    pub(crate) js: f32,
    /// The two largest log-probabilities of the row (when the plan wants
    /// them; NaN for rows not Ok).
    pub(crate) top: (f32, f32),
}

/// Running top-2 of a row, tile by tile (merged with the rule of
/// [`top2`]).
#[inline(always)]
fn merge_top2(run: &mut (f32, f32), tile: &[f32]) {
    let (a1, a2) = top2(tile);
    let lo = if a1 < run.0 { a1 } else { run.0 };
    run.1 = max_fast(max_fast(lo, a2), run.1);
    run.0 = max_fast(a1, run.0);
}

/// Scratch tiles for one call (on the stack, about 24 KiB).
pub(crate) struct Scratch {
    pub(crate) conv: [f32; TILE],
    mn: [f32; TILE],
    conv2: [f32; TILE],
}

impl Scratch {
    pub(crate) fn new() -> Self {
        Scratch {
            conv: [0.0; TILE],
            mn: [0.0; TILE],
            conv2: [0.0; TILE],
        }
    }
}

/// The plausibility threshold of a row in model `j`'s raw logit units:
/// keep `v` iff `z_j(v) >= thr`. `Err(status)` when the model's row decides
/// the whole row (NaN, or fully masked so nothing is kept).
#[inline(always)]
fn plaus_threshold(plan: &Plan<'_, '_>, b: usize, s: &mut Scratch) -> Result<Option<f32>, RowStatus> {
    let Some((j, ln_alpha)) = plan.plaus else {
        return Ok(None);
    };
    let o = plan.models[j].logits.online(b, plan.inv_t[j], &mut s.conv);
    if o.bad {
        return Err(RowStatus::Nan);
    }
    if o.max == f32::NEG_INFINITY {
        return Err(RowStatus::Masked);
    }
    // z/T_j - max/T_j >= ln alpha  <=>  z >= max + T_j ln alpha.
    Ok(Some(o.max + ln_alpha / plan.inv_t[j]))
}

/// Applies the plausibility mask of model `j` to `out[lo..hi]`.
#[inline(always)]
fn apply_plausibility(
    plan: &Plan<'_, '_>,
    b: usize,
    lo: usize,
    out: &mut [f32],
    thr: f32,
    conv: &mut [f32; TILE],
) {
    let (j, _) = plan.plaus.expect("threshold implies plausibility");
    let md = &plan.models[j].logits;
    let hi = lo + out.len();
    let vj = md.len().min(hi);
    if lo < vj {
        let z = md.tile(b, lo, vj, conv);
        for (o, &zj) in out.iter_mut().zip(z) {
            *o = if zj >= thr { *o } else { f32::NEG_INFINITY };
        }
    }
    let keep = vj.saturating_sub(lo);
    // Beyond model j's vocabulary P_j = 0: kept only when alpha = 0.
    if thr > f32::NEG_INFINITY {
        out[keep..].fill(f32::NEG_INFINITY);
    }
}

/// Log-linear row: `out = sum c_m z_m` with masks, then normalized in place.
#[inline(always)]
fn loglinear_row(plan: &Plan<'_, '_>, b: usize, out: &mut [f32], s: &mut Scratch) -> RowOut {
    let mut act = [Active::default(); MAX_MODELS];
    let (n, _) = plan.active(b, &mut act);
    let act = &act[..n];
    let thr = match plaus_threshold(plan, b, s) {
        Ok(t) => t,
        Err(st) => return fill_status(out, st),
    };
    let mut online = Online::EMPTY;
    let mut ent = 0.0f32;
    let mut top = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    let v = plan.vocab;
    let mut lo = 0;
    while lo < v {
        let hi = (lo + TILE).min(v);
        let acc = &mut out[lo..hi];
        if act.is_empty() {
            acc.fill(0.0);
        }
        for (i, a) in act.iter().enumerate() {
            let md = &plan.models[a.m].logits;
            let vm = md.len().min(hi);
            if lo < vm {
                let z = md.tile(b, lo, vm, &mut s.conv);
                let part = &mut acc[..vm - lo];
                match (i == 0, a.w > 0.0) {
                    (true, true) => accumulate::<true, true>(part, z, a.w),
                    (true, false) => accumulate::<true, false>(part, z, a.w),
                    (false, true) => accumulate::<false, true>(part, z, a.w),
                    (false, false) => accumulate::<false, false>(part, z, a.w),
                }
            }
            // Beyond model m's vocabulary the token is masked. The first model
            // initializes the tile; later ones add -inf, which keeps a NaN an
            // earlier model put there (a NaN read always surfaces).
            let tail = &mut acc[vm.saturating_sub(lo)..];
            if i == 0 {
                tail.fill(f32::NEG_INFINITY);
            } else {
                for o in tail.iter_mut() {
                    *o += f32::NEG_INFINITY;
                }
            }
        }
        if let Some(t) = thr {
            apply_plausibility(plan, b, lo, acc, t, &mut s.conv);
        }
        match (plan.want_entropy, plan.want_top) {
            (false, false) => online.push(acc, 1.0),
            (true, false) => online.push_unc::<true, false>(acc, 1.0, &mut ent, &mut top),
            (false, true) => online.push_unc::<false, true>(acc, 1.0, &mut ent, &mut top),
            (true, true) => online.push_unc::<true, true>(acc, 1.0, &mut ent, &mut top),
        }
        if online.bad {
            break;
        }
        lo = hi;
    }
    finish_log_row(out, online, ent, top)
}

/// `acc (=|+=) c * z` with the log-linear masking rule. For `c < 0` a masked
/// logit (`-inf`) must give `-inf`, not `+inf`, and a `+inf` logit is
/// invalid and must surface as NaN; for `c > 0` IEEE arithmetic already does
/// both.
#[inline(always)]
fn accumulate<const FIRST: bool, const POS: bool>(acc: &mut [f32], z: &[f32], c: f32) {
    for (o, &x) in acc.iter_mut().zip(z) {
        let x = if POS {
            x
        } else {
            let invalid = x == f32::INFINITY;
            let x = if x == f32::NEG_INFINITY { f32::INFINITY } else { x };
            if invalid { f32::NAN } else { x }
        };
        *o = if FIRST { c * x } else { *o + c * x };
    }
}

/// Writes the status fill of a row decided without computing it.
fn fill_status(out: &mut [f32], st: RowStatus) -> RowOut {
    match st {
        RowStatus::Nan => {
            out.fill(f32::NAN);
            RowOut {
                status: st,
                log_z: f32::NAN,
                entropy: f32::NAN,
                js: f32::NAN,
                top: (f32::NAN, f32::NAN),
            }
        }
        _ => {
            out.fill(f32::NEG_INFINITY);
            RowOut {
                status: RowStatus::Masked,
                log_z: f32::NEG_INFINITY,
                entropy: f32::NAN,
                js: f32::NAN,
                top: (f32::NAN, f32::NAN),
            }
        }
    }
}

/// Finishes a row of unnormalized scores `u` (already in `out`) with online
/// statistics `o` (computed at `inv_t = 1`): `out = u - ln Z`. `ent` is
/// `sum e^(u - max) (u - max)` when the entropy is wanted, `top` the two
/// largest `u` when the top-2 is (else unused).
#[inline(always)]
fn finish_log_row(out: &mut [f32], o: Online, ent: f32, top: (f32, f32)) -> RowOut {
    if o.bad {
        return fill_status(out, RowStatus::Nan);
    }
    if o.max == f32::NEG_INFINITY {
        return fill_status(out, RowStatus::Masked);
    }
    // (u - max) - ln sum, not u - (max + ln sum): for |max| large the second
    // form rounds ln sum away.
    let log_sum = o.log_sum();
    for x in out.iter_mut() {
        *x = (*x - o.max) - log_sum;
    }
    let log_z = o.max + log_sum;
    RowOut {
        status: RowStatus::Ok,
        log_z,
        // H = -sum p ln p with ln p = (u - max) - ln S: ln S - ent / S.
        entropy: log_sum - ent / o.sum,
        js: f32::NAN,
        top: ((top.0 - o.max) - log_sum, (top.1 - o.max) - log_sum),
    }
}

/// Per-model statistics for the linear pass 2.
#[derive(Clone, Copy, Default)]
struct LinModel {
    m: usize,
    max: f32,
    inv_t: f32,
    off: f32,
}

/// Mixture probabilities below this take the exact path.
const TINY: f32 = 1e-30;

/// `ln sum_m exp(y_m)` for one token with a max shift (the slow, exact path
/// for mixtures below [`TINY`]); `-inf` when every model masks the token.
#[cold]
fn linear_token_exact(plan: &Plan<'_, '_>, lm: &[LinModel], b: usize, v: usize) -> f32 {
    let mut ys = [f32::NEG_INFINITY; MAX_MODELS];
    let mut mx = f32::NEG_INFINITY;
    for (y, l) in ys.iter_mut().zip(lm) {
        let md = &plan.models[l.m].logits;
        if v < md.len() {
            let mut one = [0.0f32; 1];
            let z = md.tile(b, v, v + 1, &mut one)[0];
            *y = (z - l.max) * l.inv_t + l.off;
            mx = max_fast(*y, mx);
        }
    }
    if mx == f32::NEG_INFINITY {
        return mx;
    }
    let s: f32 = ys[..lm.len()].iter().map(|&y| exp_nonpos(y - mx)).sum();
    mx + ln(s)
}

/// Linear row: per-model log-sum-exp, then the per-token LSE over models.
#[inline(always)]
fn linear_row(plan: &Plan<'_, '_>, b: usize, out: &mut [f32], s: &mut Scratch) -> RowOut {
    let mut act = [Active::default(); MAX_MODELS];
    let (n, _) = plan.active(b, &mut act);
    let thr = match plaus_threshold(plan, b, s) {
        Ok(t) => t,
        Err(st) => return fill_status(out, st),
    };
    // Pass 1: per-model max, then sum of exp. A model whose row is fully
    // masked has no distribution: it leaves the mixture (MaskRule::All) or
    // masks the row. The first live model's terms are kept in `out` so that
    // pass 2 need not recompute them.
    let mut lm = [LinModel::default(); MAX_MODELS];
    let mut k = 0;
    let mut wsum = 0.0f32;
    // sum over live models of w_m H(P_m) (disagreement only).
    let mut hw = 0.0f32;
    // sum_v P(v) ln P(v) of the mixture before masks (entropy, disagreement).
    let mut plnp = 0.0f32;
    let want_mix = plan.want_entropy || plan.want_js;
    let mut top = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for a in &act[..n] {
        let md = &plan.models[a.m].logits;
        let (mx, bad) = md.max_bad(b, &mut s.conv);
        if bad {
            return fill_status(out, RowStatus::Nan);
        }
        if mx == f32::NEG_INFINITY {
            if plan.mask_any {
                return fill_status(out, RowStatus::Masked);
            }
            continue;
        }
        let inv_t = plan.inv_t[a.m];
        let store = if k == 0 { Some(&mut *out) } else { None };
        let sum = if plan.want_js {
            let (sum, ent) = md.sum_exp_ent(b, mx, inv_t, store, &mut s.conv);
            // H(P_m) = ln S - sum e^y y / S.
            hw += a.w * (ln(sum) - ent / sum);
            sum
        } else {
            md.sum_exp(b, mx, inv_t, store, &mut s.conv)
        };
        wsum += a.w;
        lm[k] = LinModel {
            m: a.m,
            max: mx,
            inv_t,
            off: ln(a.w) - ln(sum),
        };
        k += 1;
    }
    if k == 0 {
        return fill_status(out, RowStatus::Masked);
    }
    let ln_w = ln(wsum);
    for l in &mut lm[..k] {
        l.off -= ln_w;
    }
    let lm = &lm[..k];
    // The cached model's terms scale by w / (W S); beyond its vocabulary they are 0.
    let cached_scale = exp_nonpos(lm[0].off);
    let cached_len = plan.models[lm[0].m].logits.len();
    out[cached_len..].fill(0.0);
    let v = plan.vocab;
    let renorm = plan.mask_any || thr.is_some() || plan.inv_t_out != 1.0;
    let mut lo = 0;
    while lo < v {
        let hi = (lo + TILE).min(v);
        let n_t = hi - lo;
        // P(v) = sum_m exp(y_m(v)), y_m = (z_m - max_m) / T_m + ln(w_m / (W S_m)) <= 0.
        let acc = &mut out[lo..hi];
        for a in acc.iter_mut() {
            *a *= cached_scale;
        }
        let masked = &mut s.mn[..n_t];
        if plan.mask_any {
            masked.fill(0.0);
        }
        for (li, l) in lm.iter().enumerate() {
            let md = &plan.models[l.m].logits;
            let vm = md.len().min(hi);
            if lo < vm {
                let z = md.tile(b, lo, vm, &mut s.conv);
                if li > 0 {
                    for (a, &x) in acc.iter_mut().zip(z) {
                        *a += exp_nonpos((x - l.max) * l.inv_t + l.off);
                    }
                }
                if plan.mask_any {
                    for (q, &x) in masked.iter_mut().zip(z) {
                        *q = if x == f32::NEG_INFINITY { 1.0 } else { *q };
                    }
                }
            }
            if plan.mask_any {
                masked[vm.saturating_sub(lo)..].fill(1.0);
            }
        }
        // ln P; mixtures below 1e-30 (deep tails, masked tokens) are redone
        // exactly with a max shift so nothing underflows.
        let tiny = acc.iter().fold(false, |t, &a| t | (a < TINY));
        if tiny {
            // Lane-wise partial sums: a serial f32 sum over the tile would
            // lose about 1e-4 of the entropy on long rows.
            let mut lanes = [0.0f32; LANES];
            for (i, a) in acc.iter_mut().enumerate() {
                let p = *a;
                *a = if p < TINY {
                    linear_token_exact(plan, lm, b, lo + i)
                } else {
                    ln_pos(p)
                };
                if want_mix && p > 0.0 {
                    lanes[i % LANES] += p * *a;
                }
            }
            if want_mix {
                plnp += pairwise_sum(&lanes);
            }
        } else if want_mix {
            plnp += ln_inplace_ent(acc);
        } else {
            for a in acc.iter_mut() {
                *a = ln_pos(*a);
            }
        }
        if plan.mask_any {
            for (a, &q) in acc.iter_mut().zip(masked.iter()) {
                *a = if q != 0.0 { f32::NEG_INFINITY } else { *a };
            }
        }
        if let Some(t) = thr {
            apply_plausibility(plan, b, lo, acc, t, &mut s.conv2);
        }
        if plan.want_top {
            merge_top2(&mut top, acc);
        }
        lo = hi;
    }
    let h_mix = -plnp;
    // Rounding can push the divergence a hair below 0; it is >= 0 exactly.
    let js = if plan.want_js {
        // One live model agrees with itself exactly.
        if k == 1 {
            0.0
        } else {
            max_fast(h_mix - hw / wsum, 0.0)
        }
    } else {
        f32::NAN
    };
    if !renorm {
        return RowOut {
            status: RowStatus::Ok,
            log_z: ln_w,
            entropy: h_mix,
            js,
            top,
        };
    }
    // ln Z = (ln W + max u') / T_out + ln sum exp((u' - max) / T_out): the
    // sum is formed before scaling so extreme T_out overflows to inf, never NaN.
    let (max, log_sum, st, entropy) = if plan.want_entropy {
        log_softmax_row_inplace_ent::<true>(out, plan.inv_t_out)
    } else {
        log_softmax_row_inplace_ent::<false>(out, plan.inv_t_out)
    };
    match st {
        RowStatus::Ok => RowOut {
            status: st,
            log_z: (ln_w + max) * plan.inv_t_out + log_sum,
            entropy,
            js,
            // The same monotone map as the row: (u - max) / T_out - ln S.
            top: (
                (top.0 - max) * plan.inv_t_out - log_sum,
                (top.1 - max) * plan.inv_t_out - log_sum,
            ),
        },
        other => fill_status(out, other),
    }
}

/// Combines `models` into one distribution per row.
///
/// The output shape is taken from `out`: `B` rows of `V` tokens. Every
/// model must have `B` rows and `V_m <= V` tokens. See the module
/// documentation for the exact semantics and edge cases.
///
/// Errors (checked before anything is written):
/// [`Error::Empty`] (`models`), [`Error::TooLarge`] (`models` beyond
/// [`MAX_MODELS`], `models.logits.len` beyond `V`, `vocab` beyond `u32` ids
/// when `argmax` is asked for), [`Error::LengthMismatch`] (row counts, the
/// weight list or table, the per-row outputs, `probs` vs `log_probs`),
/// [`Error::NonFinite`] / [`Error::OutOfRange`] (temperatures, weights,
/// negative linear weights, coefficients whose scaled value overflows,
/// `plausibility.alpha` outside `[0, 1]`), [`Error::ZeroSum`] (linear
/// weights of a row summing to 0), [`Error::IndexOutOfBounds`]
/// (`plausibility.model`), [`Error::Unsupported`] (neither `log_probs` nor
/// `probs` given, or `disagreement` asked for in log-linear mode).
///
/// ```
/// use medley_core::{Rows, RowsMut, ensemble::{combine, Config, Model, Output}};
/// // Two models, one row, four tokens.
/// let a = [2.0f32, 1.0, 0.0, f32::NEG_INFINITY];
/// let b = [0.0f32, 1.0, 2.0, 3.0];
/// let models = [Model::new(Rows::single(&a)), Model::new(Rows::single(&b))];
/// let mut lp = [0.0f32; 4];
/// let mut best = [0u32; 1];
/// let out = Output { log_probs: Some(RowsMut::single(&mut lp)), argmax: Some(&mut best), ..Default::default() };
/// let report = combine(&models, &Config::linear(&[0.5, 0.5]), out).unwrap();
/// assert!(report.is_clean());
/// // Token 3 is impossible under model a but keeps model b's mass (OR).
/// assert!(lp[3].is_finite());
/// let total: f32 = lp.iter().map(|x| x.exp()).sum();
/// assert!((total - 1.0).abs() < 1e-6);
/// ```
///
/// The per-row uncertainty of the same combination, fused into the call:
///
/// ```
/// use medley_core::{Rows, RowsMut, ensemble::{combine, Config, Model, Output}};
/// let a = [2.0f32, 1.0, 0.0, f32::NEG_INFINITY];
/// let b = [0.0f32, 1.0, 2.0, 3.0];
/// let models = [Model::new(Rows::single(&a)), Model::new(Rows::single(&b))];
/// let mut lp = [0.0f32; 4];
/// let (mut h, mut top, mut margin, mut js) = ([0.0f32], [0.0f32], [0.0f32], [0.0f32]);
/// let out = Output {
///     log_probs: Some(RowsMut::single(&mut lp)),
///     entropy: Some(&mut h),
///     top1_prob: Some(&mut top),
///     margin: Some(&mut margin),
///     disagreement: Some(&mut js),
///     ..Default::default()
/// };
/// combine(&models, &Config::linear(&[0.5, 0.5]), out).unwrap();
/// let p: Vec<f32> = lp.iter().map(|x| x.exp()).collect();
/// let want_h: f32 = -p.iter().zip(&lp).map(|(p, l)| p * l).sum::<f32>();
/// assert!((h[0] - want_h).abs() < 1e-5);
/// assert!((top[0] - p.iter().cloned().fold(0.0, f32::max)).abs() < 1e-6);
/// assert!(margin[0] >= 0.0 && margin[0] <= top[0]);
/// // The two models disagree (a prefers token 0, b token 3): 0 < JS <= ln 2.
/// assert!(js[0] > 0.0 && js[0] <= 2f32.ln());
/// ```
pub fn combine(models: &[Model<'_>], cfg: &Config<'_>, mut out: Output<'_>) -> Result<Report, Error> {
    let (rows, vocab) = match (&out.log_probs, &out.probs) {
        (Some(l), Some(p)) => {
            ensure_len("probs.rows", l.rows(), p.rows())?;
            ensure_len("probs.len", l.len(), p.len())?;
            (l.rows(), l.len())
        }
        (Some(l), None) => (l.rows(), l.len()),
        (None, Some(p)) => (p.rows(), p.len()),
        (None, None) => {
            return Err(Error::Unsupported {
                what: "no row output: give log_probs or probs",
            });
        }
    };
    if let Some(a) = &out.argmax {
        ensure_len("argmax", rows, a.len())?;
        ensure(
            vocab <= u32::MAX as usize,
            Error::TooLarge {
                arg: "vocab",
                index: 0,
                max: u32::MAX as usize,
                got: vocab,
            },
        )?;
    }
    if let Some(z) = &out.log_normalizer {
        ensure_len("log_normalizer", rows, z.len())?;
    }
    for (arg, o) in [
        ("entropy", &out.entropy),
        ("top1_prob", &out.top1_prob),
        ("margin", &out.margin),
        ("disagreement", &out.disagreement),
    ] {
        if let Some(o) = o {
            ensure_len(arg, rows, o.len())?;
        }
    }
    ensure(
        out.disagreement.is_none() || cfg.mode == Mode::Linear,
        Error::Unsupported {
            what: "disagreement is defined for linear mixtures",
        },
    )?;
    let mut plan = Plan::new(models, cfg, rows, vocab)?;
    plan.want_entropy = out.entropy.is_some();
    plan.want_js = out.disagreement.is_some();
    let want_top = out.top1_prob.is_some() || out.margin.is_some();
    plan.want_top = want_top;
    debug_assert!(out.wants_uncertainty() == (plan.want_entropy || plan.want_js || want_top));
    let mut s = Scratch::new();
    let mut report = Report::default();
    crate::simd::dispatch(
        #[inline(always)]
        || {
            for b in 0..rows {
                // The log-probability row, or the probability row used as scratch.
                let r = match (&mut out.log_probs, &mut out.probs) {
                    (Some(l), _) => combine_row(&plan, b, l.row_mut(b), &mut s),
                    (None, Some(p)) => combine_row(&plan, b, p.row_mut(b), &mut s),
                    (None, None) => unreachable!("checked above"),
                };
                report.add(r.status);
                if let Some(a) = out.argmax.as_deref_mut() {
                    let row = match (&out.log_probs, &out.probs) {
                        (Some(l), _) => l.row(b),
                        (None, Some(p)) => p.row(b),
                        (None, None) => unreachable!("checked above"),
                    };
                    a[b] = match r.status {
                        RowStatus::Ok => argmax(row).map_or(NO_TOKEN, |i| i as u32),
                        _ => NO_TOKEN,
                    };
                }
                if let Some(z) = out.log_normalizer.as_deref_mut() {
                    z[b] = r.log_z;
                }
                let ok = r.status == RowStatus::Ok;
                if want_top {
                    let (p1, p2) = if ok {
                        (exp(r.top.0), exp(r.top.1))
                    } else {
                        (f32::NAN, f32::NAN)
                    };
                    if let Some(t) = out.top1_prob.as_deref_mut() {
                        t[b] = p1;
                    }
                    if let Some(mg) = out.margin.as_deref_mut() {
                        mg[b] = p1 - p2;
                    }
                }
                if let Some(h) = out.entropy.as_deref_mut() {
                    // Rounding can give -1e-7 for a one-hot row; H >= 0.
                    h[b] = if ok { max_fast(r.entropy, 0.0) } else { f32::NAN };
                }
                if let Some(d) = out.disagreement.as_deref_mut() {
                    d[b] = if ok { r.js } else { f32::NAN };
                }
                match (&mut out.log_probs, &mut out.probs) {
                    (Some(l), Some(p)) => exp_shift_into(l.row(b), 0.0, p.row_mut(b)),
                    (None, Some(p)) => exp_shift_inplace(p.row_mut(b), 0.0),
                    _ => {}
                }
            }
        },
    );
    Ok(report)
}

/// Writes row `b`'s log-probabilities into `out` (length `V`).
#[inline(always)]
pub(crate) fn combine_row(plan: &Plan<'_, '_>, b: usize, out: &mut [f32], s: &mut Scratch) -> RowOut {
    match plan.mode {
        Mode::LogLinear => loglinear_row(plan, b, out, s),
        Mode::Linear => linear_row(plan, b, out, s),
    }
}
