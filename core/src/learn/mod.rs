//! Learning combination weights from held-out data, and context-dependent
//! weights without training.
//!
//! Everything starts from held-out rows: `B` positions where each of `M`
//! models gave logits and the token that actually came next (`targets`, one
//! per row) is known.
//!
//! - [`target_log_probs`] reduces the full logits to the `B x M` table
//!   `table[b][m] = ln P_m(y_b | row b)`, one pass over each model's row.
//!   It is all that linear interpolation needs.
//! - [`fit_linear_em`] fits the weights `w` of a linear mixture
//!   `sum_m w_m P_m` (weights on the simplex) by expectation-maximization on
//!   that table: the held-out log-likelihood never decreases.
//! - [`fit_log_linear_newton`] fits the signed coefficients `c` of a
//!   log-linear combination `softmax(sum_m c_m z_m / T_m)` by Newton's method
//!   on the full logits: the negative log-likelihood is convex in `c`.
//! - [`posterior_weights`] gives per-row linear weights from each model's
//!   recent log-likelihood (a Bayesian posterior over the models restricted
//!   to a window of preceding rows), with no training at all.
//!
//! The results plug straight into [`ensemble::combine`](crate::ensemble::combine):
//! EM weights as [`Config::linear`](crate::ensemble::Config::linear), Newton
//! coefficients as [`Config::log_linear`](crate::ensemble::Config::log_linear)
//! with the same models and temperatures, posterior weights as
//! [`Weights::PerRow`](crate::ensemble::Weights::PerRow).
//!
//! ```
//! use medley_core::ensemble::{combine, Config, Model, Output};
//! use medley_core::learn::{fit_linear_em, target_log_probs, EmOptions};
//! use medley_core::{Rows, RowsMut};
//! // Held-out rows: model a is right on rows 0 and 1, model b on row 2.
//! let a = [3.0f32, 0.0, 0.0,  0.0, 3.0, 0.0,  3.0, 0.0, 0.0];
//! let b = [0.0f32, 0.0, 3.0,  0.0, 0.0, 3.0,  0.0, 0.0, 3.0];
//! let models = [Model::new(Rows::dense(&a, 3, 3)?), Model::new(Rows::dense(&b, 3, 3)?)];
//! let targets = [0u32, 1, 2];
//! let mut table = [0.0f32; 6];
//! target_log_probs(&models, &targets, 3, RowsMut::dense(&mut table, 3, 2)?)?;
//! let mut w = [0.0f32; 2];
//! let report = fit_linear_em(Rows::dense(&table, 3, 2)?, None, &EmOptions::default(), &mut w)?;
//! assert!(report.log_likelihood_after >= report.log_likelihood_before);
//! assert!(w[0] > w[1]); // a is right twice as often
//! // Use the fitted weights on new rows.
//! let mut lp = [0.0f32; 9];
//! combine(&models, &Config::linear(&w), Output { log_probs: Some(RowsMut::dense(&mut lp, 3, 3)?), ..Default::default() })?;
//! # Ok::<(), medley_core::Error>(())
//! ```
//!
//! All fitting arithmetic (log-likelihoods, responsibilities, gradients,
//! Hessians) is `f64`; inputs and outputs are `f32`. Nothing allocates.

mod em;
mod math64;
mod newton;
mod posterior;

pub use em::{EmOptions, EmReport, fit_linear_em};
pub use newton::{MAX_NEWTON_MODELS, NewtonOptions, NewtonReport, fit_log_linear_newton};
pub use posterior::{PosteriorOptions, posterior_weights};

use crate::ensemble::{MAX_MODELS, Model};
use crate::error::{Error, ensure, ensure_len, ensure_len_at};
use crate::math::ln;
use crate::rowops::TILE;
use crate::rows::RowsMut;
use crate::softmax::{Report, inv_temperature};

/// Checks the models of a fit: non-empty, at most `max`, `rows` rows each,
/// valid temperatures. Returns `1 / T_m` per model.
fn check_models(models: &[Model<'_>], rows: usize, max: usize) -> Result<[f32; MAX_MODELS], Error> {
    ensure(!models.is_empty(), Error::Empty { arg: "models" })?;
    ensure(
        models.len() <= max,
        Error::TooLarge {
            arg: "models",
            index: 0,
            max,
            got: models.len(),
        },
    )?;
    let mut inv_t = [0.0f32; MAX_MODELS];
    for (i, md) in models.iter().enumerate() {
        ensure_len_at("models.logits.rows", i, rows, md.logits.rows())?;
        inv_t[i] = inv_temperature("models.temperature", i, md.temperature)?;
    }
    Ok(inv_t)
}

/// Checks that every target is below `bound`; the error's `index` is the row.
/// Checks the width `m` of a `B x M` table of per-model log-probabilities:
/// at least one model, at most [`MAX_MODELS`].
fn check_table_width(m: usize) -> Result<(), Error> {
    ensure(m > 0, Error::Empty { arg: "log_probs" })?;
    ensure(
        m <= MAX_MODELS,
        Error::TooLarge {
            arg: "log_probs.len",
            index: 0,
            max: MAX_MODELS,
            got: m,
        },
    )
}

/// Checks `v` (finite, `>= 0`, positive sum; errors name `arg`) and writes
/// `v / sum v` into `out[..v.len()]`.
fn normalized(arg: &'static str, v: &[f32], out: &mut [f64]) -> Result<(), Error> {
    let mut sum = 0.0f64;
    for (i, &x) in v.iter().enumerate() {
        ensure(x.is_finite(), Error::NonFinite { arg, index: i })?;
        ensure(x >= 0.0, Error::OutOfRange { arg, index: i })?;
        sum += x as f64;
    }
    ensure(sum > 0.0, Error::ZeroSum { arg, index: 0 })?;
    for (d, &x) in out.iter_mut().zip(v) {
        *d = x as f64 / sum;
    }
    Ok(())
}

fn check_targets(targets: &[u32], bound: usize) -> Result<(), Error> {
    for (b, &y) in targets.iter().enumerate() {
        ensure(
            (y as usize) < bound,
            Error::IndexOutOfBounds {
                arg: "targets",
                index: b,
                bound,
            },
        )?;
    }
    Ok(())
}

/// Fills the `B x M` table of the models' log-probabilities at the targets:
/// `table[b][m] = ln softmax(z_m[b] / T_m)[targets[b]]`.
///
/// `B = targets.len()`; every model must have `B` rows. `vocab` is the
/// shared vocabulary `V` (as the output length is in
/// [`combine`](crate::ensemble::combine)): every model covers its first
/// `V_m <= V` tokens and every target must be below `V`. A target
/// `V_m <= y < V` has probability 0 under model `m`: its entry is `-inf`.
/// The table is a [`RowsMut`] of `B` rows of `M` entries (any row stride).
///
/// One pass over each model's row: online (max, sum of exp) statistics, plus
/// one read of the logit at the target. The entry is
/// `(z_y - max) / T_m - ln sum_v exp((z_v - max) / T_m)`, exactly the value
/// [`softmax::log_softmax`](crate::softmax::log_softmax) writes for the
/// target (`f32` arithmetic).
///
/// Edge cases, reported rather than raised (the logits are only read after
/// the arguments are checked):
/// - a model whose row is fully masked (every logit `-inf`) has no
///   distribution: its entry is `-inf`; so is the entry of a target whose
///   own logit is `-inf`.
/// - a NaN or `+inf` logit in a model's row makes that entry NaN (as
///   `combine` treats such rows); [`Report::nan_rows`] counts the table rows
///   with at least one NaN entry. The fitters refuse NaN entries
///   ([`Error::NonFinite`]).
/// - [`Report::masked_rows`] counts the table rows where every entry is
///   `-inf` (no model gives the target any probability). EM refuses such
///   rows: a mixture cannot explain them.
///
/// Errors (checked before anything is written): [`Error::Empty`] (`models`),
/// [`Error::TooLarge`] (`models` beyond [`MAX_MODELS`],
/// `models.logits.len` beyond `vocab`), [`Error::LengthMismatch`]
/// (`models.logits.rows`, `table.rows`, `table.len`), [`Error::NonFinite`] /
/// [`Error::OutOfRange`] (`models.temperature`), [`Error::IndexOutOfBounds`]
/// (`targets`, with `index` the row and `bound` = `vocab`).
///
/// ```
/// use medley_core::learn::target_log_probs;
/// use medley_core::ensemble::Model;
/// use medley_core::{Rows, RowsMut};
/// let a = [1.0f32, 2.0, 3.0,  0.0, 0.0, 0.0];   // 2 rows x 3 tokens
/// let b = [5.0f32, 5.0,       0.0, 9.0];        // 2 rows x 2 tokens (V_b = 2)
/// let models = [Model::new(Rows::dense(&a, 2, 3)?), Model::new(Rows::dense(&b, 2, 2)?)];
/// let mut table = [0.0f32; 4];
/// let report = target_log_probs(&models, &[0, 2], 3, RowsMut::dense(&mut table, 2, 2)?)?;
/// assert!(report.is_clean());
/// assert!((table[0] - (1.0 - (1f32.exp() + 2f32.exp() + 3f32.exp()).ln())).abs() < 1e-6);
/// assert!((table[1] - 0.5f32.ln()).abs() < 1e-6);
/// assert!((table[2] + 3f32.ln()).abs() < 1e-6);
/// assert_eq!(table[3], f32::NEG_INFINITY); // token 2 is beyond model b's vocabulary
/// # Ok::<(), medley_core::Error>(())
/// ```
pub fn target_log_probs(
    models: &[Model<'_>],
    targets: &[u32],
    vocab: usize,
    mut table: RowsMut<'_, f32>,
) -> Result<Report, Error> {
    let rows = targets.len();
    let inv_t = check_models(models, rows, MAX_MODELS)?;
    for (i, md) in models.iter().enumerate() {
        ensure(
            md.logits.len() <= vocab,
            Error::TooLarge {
                arg: "models.logits.len",
                index: i,
                max: vocab,
                got: md.logits.len(),
            },
        )?;
    }
    ensure_len("table.rows", rows, table.rows())?;
    ensure_len("table.len", models.len(), table.len())?;
    check_targets(targets, vocab)?;
    let mut report = Report::default();
    crate::simd::dispatch(
        #[inline(always)]
        || {
            let mut tile = [0.0f32; TILE];
            for (b, &y) in targets.iter().enumerate() {
                let y = y as usize;
                let out = table.row_mut(b);
                let (mut nan, mut all_masked) = (false, true);
                for ((o, md), &it) in out.iter_mut().zip(models).zip(&inv_t) {
                    let lg = &md.logits;
                    let st = lg.online(b, it, &mut tile);
                    *o = if st.bad {
                        f32::NAN
                    } else if st.max == f32::NEG_INFINITY || y >= lg.len() {
                        f32::NEG_INFINITY
                    } else {
                        let mut one = [0.0f32; 1];
                        let z = lg.tile(b, y, y + 1, &mut one)[0];
                        (z - st.max) * it - ln(st.sum)
                    };
                    nan |= o.is_nan();
                    all_masked &= *o == f32::NEG_INFINITY;
                }
                if nan {
                    report.nan_rows += 1;
                } else if all_masked {
                    report.masked_rows += 1;
                }
            }
        },
    );
    Ok(report)
}
