//! Linear interpolation weights by expectation-maximization.

// Matrix and per-model loops read best with indices.
#![allow(clippy::needless_range_loop)]

use super::math64::{exp64, ln64};
use super::{check_table_width, normalized};
use crate::ensemble::MAX_MODELS;
use crate::error::{Error, ensure, ensure_len};
use crate::rows::Rows;

/// Options of [`fit_linear_em`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmOptions {
    /// Stop when one iteration improves the mean log-likelihood `L` by at
    /// most `tolerance * |L|` (relative improvement). Finite, `>= 0`.
    /// Default `1e-9`.
    pub tolerance: f64,
    /// Most iterations (passes over the table after the first). Default 1000.
    /// 0 returns the (normalized) initial weights.
    pub max_iterations: usize,
}

impl Default for EmOptions {
    fn default() -> Self {
        Self {
            tolerance: 1e-9,
            max_iterations: 1000,
        }
    }
}

/// What [`fit_linear_em`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct EmReport {
    /// Iterations accepted (weight updates written).
    pub iterations: usize,
    /// Mean held-out log-likelihood per row, in nats, at the initial weights:
    /// `(1/B) sum_b ln sum_m w_m exp(table[b][m])`.
    pub log_likelihood_before: f64,
    /// The same at the returned weights (at the `f64` iterate, which the
    /// `f32` output rounds); never below `log_likelihood_before`.
    pub log_likelihood_after: f64,
    /// True when the relative improvement fell to the tolerance (or rounding
    /// stopped further improvement) before the iteration cap.
    pub converged: bool,
}

/// One EM pass: returns the mean log-likelihood at `w` and writes the
/// updated weights (mean responsibilities, normalized) into `next`.
fn em_pass(t: &Rows<'_, f32>, w: &[f64], next: &mut [f64]) -> f64 {
    let m = w.len();
    let mut lw = [f64::NEG_INFINITY; MAX_MODELS];
    for (l, &x) in lw.iter_mut().zip(w) {
        *l = if x > 0.0 { ln64(x) } else { f64::NEG_INFINITY };
    }
    next.fill(0.0);
    let mut ll = 0.0f64;
    let mut a = [0.0f64; MAX_MODELS];
    for b in 0..t.rows() {
        let row = t.row(b);
        let mut mx = f64::NEG_INFINITY;
        for i in 0..m {
            a[i] = if w[i] > 0.0 && row[i] > f32::NEG_INFINITY {
                lw[i] + row[i] as f64
            } else {
                f64::NEG_INFINITY
            };
            mx = if a[i] > mx { a[i] } else { mx };
        }
        // Validation guarantees a live model per row: mx is finite.
        let mut s = 0.0f64;
        for x in &mut a[..m] {
            *x = if *x > f64::NEG_INFINITY {
                exp64(*x - mx)
            } else {
                0.0
            };
            s += *x;
        }
        ll += mx + ln64(s);
        let inv = 1.0 / s;
        for (n, &x) in next.iter_mut().zip(&a[..m]) {
            *n += x * inv;
        }
    }
    let total: f64 = next.iter().sum();
    for n in next.iter_mut() {
        *n /= total;
    }
    ll / t.rows() as f64
}

/// Fits linear interpolation weights `w` (on the simplex) maximizing the
/// held-out log-likelihood `(1/B) sum_b ln sum_m w_m P_m(y_b)`, by
/// expectation-maximization on the `B x M` table of log-probabilities
/// `log_probs[b][m] = ln P_m(y_b)` (from [`target_log_probs`](super::target_log_probs)).
///
/// Each iteration computes the responsibilities
/// `r_bm = w_m P_bm / sum_k w_k P_bk` in log space (max-shifted, so tiny
/// probabilities are exact) and sets `w_m = (1/B) sum_b r_bm`; all in `f64`.
/// The log-likelihood is concave in `w` and EM never decreases it; the
/// function also enforces that: if rounding ever made a step worse it stops
/// and keeps the previous weights. Iterations stop when the relative
/// improvement is at most [`EmOptions::tolerance`], or after
/// [`EmOptions::max_iterations`].
///
/// - `initial`: starting weights (`M` values, finite, `>= 0`, positive sum;
///   normalized by their sum), or `None` for uniform `1/M`. A model starting
///   at weight 0 stays at 0 (EM's fixed point), so start every model you want
///   fitted above 0.
/// - Entries may be `-inf` (the model gives the target probability 0) and
///   need not be normalized log-probabilities.
/// - `weights` receives the `M` fitted weights (sum 1 up to `f32` rounding).
///
/// Errors (checked before anything is written): [`Error::Empty`]
/// (`log_probs` with no row or no column), [`Error::TooLarge`]
/// (`log_probs.len` beyond [`MAX_MODELS`](crate::ensemble::MAX_MODELS)),
/// [`Error::LengthMismatch`] (`weights`, `initial` not of length `M`),
/// [`Error::NonFinite`] (`log_probs` with `index = b * M + m` for a NaN or
/// `+inf` entry; `initial`; `opts.tolerance`), [`Error::OutOfRange`]
/// (`initial` negative, `opts.tolerance` negative; `log_probs` with `index`
/// the row when a row is `-inf` under every model of nonzero initial weight:
/// the likelihood would be 0 whatever the weights), [`Error::ZeroSum`]
/// (`initial`).
///
/// ```
/// use medley_core::learn::{fit_linear_em, EmOptions};
/// use medley_core::Rows;
/// // ln P_m(y_b) for 4 rows and 2 models; model 1 never explains row 3.
/// let table = [-0.1f32, -2.0, -0.2, -2.5, -3.0, -0.1, -0.5, f32::NEG_INFINITY];
/// let mut w = [0.0f32; 2];
/// let r = fit_linear_em(Rows::dense(&table, 4, 2)?, None, &EmOptions::default(), &mut w)?;
/// assert!(r.converged && r.log_likelihood_after >= r.log_likelihood_before);
/// assert!((w[0] + w[1] - 1.0).abs() < 1e-6 && w[0] > 0.5);
/// # Ok::<(), medley_core::Error>(())
/// ```
pub fn fit_linear_em(
    log_probs: Rows<'_, f32>,
    initial: Option<&[f32]>,
    opts: &EmOptions,
    weights: &mut [f32],
) -> Result<EmReport, Error> {
    let (rows, m) = (log_probs.rows(), log_probs.len());
    ensure(rows > 0, Error::Empty { arg: "log_probs" })?;
    check_table_width(m)?;
    ensure_len("weights", m, weights.len())?;
    ensure(
        opts.tolerance.is_finite(),
        Error::NonFinite {
            arg: "opts.tolerance",
            index: 0,
        },
    )?;
    ensure(
        opts.tolerance >= 0.0,
        Error::OutOfRange {
            arg: "opts.tolerance",
            index: 0,
        },
    )?;
    let mut w = [0.0f64; MAX_MODELS];
    match initial {
        None => w[..m].fill(1.0 / m as f64),
        Some(init) => {
            ensure_len("initial", m, init.len())?;
            normalized("initial", init, &mut w[..m])?;
        }
    }
    for b in 0..rows {
        let row = log_probs.row(b);
        let mut live = false;
        for (i, &x) in row.iter().enumerate() {
            ensure(
                !(x.is_nan() || x == f32::INFINITY),
                Error::NonFinite {
                    arg: "log_probs",
                    index: b * m + i,
                },
            )?;
            live |= w[i] > 0.0 && x > f32::NEG_INFINITY;
        }
        ensure(
            live,
            Error::OutOfRange {
                arg: "log_probs",
                index: b,
            },
        )?;
    }

    let mut cur = [0.0f64; MAX_MODELS];
    cur[..m].copy_from_slice(&w[..m]);
    let mut next = [0.0f64; MAX_MODELS];
    let mut after = [0.0f64; MAX_MODELS];
    let ll0 = em_pass(&log_probs, &cur[..m], &mut next[..m]);
    let (mut ll, mut iterations, mut converged) = (ll0, 0usize, false);
    while iterations < opts.max_iterations {
        let ll_next = em_pass(&log_probs, &next[..m], &mut after[..m]);
        if !(ll_next >= ll) {
            // EM cannot decrease the likelihood: only rounding can. Keep `cur`.
            converged = true;
            break;
        }
        iterations += 1;
        let gain = ll_next - ll;
        cur[..m].copy_from_slice(&next[..m]);
        next[..m].copy_from_slice(&after[..m]);
        ll = ll_next;
        if gain <= opts.tolerance * ll.abs() {
            converged = true;
            break;
        }
    }
    for (o, &x) in weights.iter_mut().zip(&cur[..m]) {
        *o = x as f32;
    }
    Ok(EmReport {
        iterations,
        log_likelihood_before: ll0,
        log_likelihood_after: ll,
        converged,
    })
}
