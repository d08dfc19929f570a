//! The softmax family over rows: [`softmax`], [`log_softmax`], [`logsumexp`],
//! each with a temperature, plus in-place `f32` forms.
//!
//! For a row `x` of length `n` and temperature `T > 0`:
//!
//! - `logsumexp(x) = ln sum_i exp(x_i / T)`
//! - `log_softmax(x)_i = x_i / T - logsumexp(x)`
//! - `softmax(x)_i = exp(log_softmax(x)_i)`
//!
//! Computed stably for every finite input: the row maximum is subtracted
//! before scaling by `1/T` (so huge logits with a small `T` do not overflow),
//! in `f32` with lane-wise partial sums. Inputs may be `f32`, `f16` or `bf16`.
//!
//! # Edge cases (every one is defined; none produces an unflagged NaN)
//!
//! | row contents | softmax | log_softmax | logsumexp | counted in |
//! |---|---|---|---|---|
//! | finite and `-inf` mixed | `-inf` entries get 0 | `-inf` entries get `-inf` | finite | — |
//! | every entry `-inf`, or `n = 0` ("fully masked") | all 0 | all `-inf` | `-inf` | [`Report::masked_rows`] |
//! | `k >= 1` entries `+inf`, no NaN | `1/k` on the `+inf` entries, 0 elsewhere (the limit) | `-ln k` / `-inf` | `+inf` | — |
//! | any NaN | all NaN | all NaN | NaN | [`Report::nan_rows`] |
//!
//! Probabilities below about 1.2e-38 are flushed to 0 (no subnormal results);
//! log-probabilities below the `f32` range saturate to `-inf`.

use crate::element::Element;
use crate::error::{Error, ensure, ensure_len};
use crate::math::ln;
use crate::rowops::{
    Bad, Online, TILE, classify_bad, exp_shift_inplace, row_online, write_exp_scale, write_shift_scale,
};
use crate::rows::{Rows, RowsMut};

/// What a row-wise call found, so that masked and NaN rows are never silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Report {
    /// Rows whose every entry was masked (`-inf`) or empty: their
    /// probabilities are all 0, log-probabilities all `-inf`.
    pub masked_rows: usize,
    /// Rows whose outputs are NaN because an input read for them was NaN (or
    /// otherwise invalid, as the function documents).
    pub nan_rows: usize,
}

impl Report {
    /// True if no row was masked or NaN.
    pub fn is_clean(&self) -> bool {
        self.masked_rows == 0 && self.nan_rows == 0
    }

    pub(crate) fn add(&mut self, s: RowStatus) {
        match s {
            RowStatus::Ok => {}
            RowStatus::Masked => self.masked_rows += 1,
            RowStatus::Nan => self.nan_rows += 1,
        }
    }
}

/// Status of one row, for internal bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowStatus {
    Ok,
    Masked,
    Nan,
}

/// Validates a temperature and returns `1 / T`.
pub(crate) fn inv_temperature(arg: &'static str, index: usize, t: f32) -> Result<f32, Error> {
    ensure(t.is_finite(), Error::NonFinite { arg, index })?;
    let inv = 1.0 / t;
    ensure(t > 0.0 && inv.is_finite(), Error::OutOfRange { arg, index })?;
    Ok(inv)
}

/// Which outputs a row finish writes.
#[derive(Clone, Copy)]
enum Finish {
    Prob,
    LogProb,
}

/// One row: statistics, then the finish into `out` (if any); returns the
/// log-sum-exp and the status.
#[inline(always)]
fn row<T: Element>(
    x: &[T],
    inv_t: f32,
    finish: Option<(Finish, &mut [f32])>,
    tile: &mut [f32; TILE],
) -> (f32, RowStatus) {
    let o: Online = row_online(x, inv_t, tile);
    if o.bad {
        return match classify_bad(x) {
            Bad::Nan => {
                if let Some((_, out)) = finish {
                    out.fill(f32::NAN);
                }
                (f32::NAN, RowStatus::Nan)
            }
            Bad::PosInf(k) => {
                if let Some((f, out)) = finish {
                    let (hit, miss) = match f {
                        Finish::Prob => (1.0 / k as f32, 0.0),
                        Finish::LogProb => (-ln(k as f32), f32::NEG_INFINITY),
                    };
                    for (o, v) in out.iter_mut().zip(x) {
                        *o = if v.to_f32() == f32::INFINITY { hit } else { miss };
                    }
                }
                (f32::INFINITY, RowStatus::Ok)
            }
        };
    }
    if o.max == f32::NEG_INFINITY {
        if let Some((f, out)) = finish {
            out.fill(match f {
                Finish::Prob => 0.0,
                Finish::LogProb => f32::NEG_INFINITY,
            });
        }
        return (f32::NEG_INFINITY, RowStatus::Masked);
    }
    let log_sum = o.log_sum();
    match finish {
        Some((Finish::LogProb, out)) => write_shift_scale(x, o.max, inv_t, log_sum, out),
        Some((Finish::Prob, out)) => write_exp_scale(x, o.max, inv_t, 1.0 / o.sum, out),
        None => {}
    }
    (o.max * inv_t + log_sum, RowStatus::Ok)
}

fn check_same_shape<T>(x: &Rows<'_, T>, out: &RowsMut<'_, f32>) -> Result<(), Error> {
    ensure_len("out.rows", x.rows(), out.rows())?;
    ensure_len("out.len", x.len(), out.len())
}

fn rows_finish<T: Element>(
    x: Rows<'_, T>,
    temperature: f32,
    mut out: RowsMut<'_, f32>,
    f: Finish,
) -> Result<Report, Error> {
    let inv_t = inv_temperature("temperature", 0, temperature)?;
    check_same_shape(&x, &out)?;
    let mut tile = [0.0f32; TILE];
    let mut report = Report::default();
    crate::simd::dispatch(
        #[inline(always)]
        || {
            for b in 0..x.rows() {
                let (_, s) = row(x.row(b), inv_t, Some((f, out.row_mut(b))), &mut tile);
                report.add(s);
            }
        },
    );
    Ok(report)
}

/// Softmax of each row of `x` at `temperature`, into `out` (same rows and
/// row length; strides may differ).
///
/// Errors: [`Error::NonFinite`] / [`Error::OutOfRange`] for a temperature that
/// is not finite and positive (or whose reciprocal overflows);
/// [`Error::LengthMismatch`] (`out.rows`, `out.len`) when shapes differ.
///
/// ```
/// use medley_core::{Rows, RowsMut, softmax::softmax};
/// let x = [1.0f32, 2.0, f32::NEG_INFINITY, 3.0];
/// let mut p = [0.0f32; 4];
/// let report = softmax(Rows::single(&x), 1.0, RowsMut::single(&mut p)).unwrap();
/// assert!(report.is_clean());
/// assert_eq!(p[2], 0.0);
/// assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
/// ```
pub fn softmax<T: Element>(x: Rows<'_, T>, temperature: f32, out: RowsMut<'_, f32>) -> Result<Report, Error> {
    rows_finish(x, temperature, out, Finish::Prob)
}

/// Log-softmax of each row of `x` at `temperature`, into `out`. Errors as
/// [`softmax`].
pub fn log_softmax<T: Element>(
    x: Rows<'_, T>,
    temperature: f32,
    out: RowsMut<'_, f32>,
) -> Result<Report, Error> {
    rows_finish(x, temperature, out, Finish::LogProb)
}

/// Log-sum-exp of each row of `x` at `temperature` (`ln sum exp(x_i / T)`),
/// one value per row into `out` (`out.len() == x.rows()`).
///
/// Errors: temperature as [`softmax`]; [`Error::LengthMismatch`] (`out`) when
/// `out` does not have one slot per row.
pub fn logsumexp<T: Element>(x: Rows<'_, T>, temperature: f32, out: &mut [f32]) -> Result<Report, Error> {
    let inv_t = inv_temperature("temperature", 0, temperature)?;
    ensure_len("out", x.rows(), out.len())?;
    let mut tile = [0.0f32; TILE];
    let mut report = Report::default();
    crate::simd::dispatch(
        #[inline(always)]
        || {
            for (b, o) in out.iter_mut().enumerate() {
                let (lse, s) = row(x.row(b), inv_t, None, &mut tile);
                *o = lse;
                report.add(s);
            }
        },
    );
    Ok(report)
}

/// In-place form of [`log_softmax`] for `f32` rows; also returns each row's
/// log-sum-exp through `lse` when given (`lse.len() == x.rows()`).
pub fn log_softmax_inplace(
    mut x: RowsMut<'_, f32>,
    temperature: f32,
    lse: Option<&mut [f32]>,
) -> Result<Report, Error> {
    let inv_t = inv_temperature("temperature", 0, temperature)?;
    if let Some(l) = &lse {
        ensure_len("lse", x.rows(), l.len())?;
    }
    let mut report = Report::default();
    let mut lse = lse;
    crate::simd::dispatch(
        #[inline(always)]
        || {
            for b in 0..x.rows() {
                let (l, s) = log_softmax_row_inplace(x.row_mut(b), inv_t);
                if let Some(out) = lse.as_deref_mut() {
                    out[b] = l;
                }
                report.add(s);
            }
        },
    );
    Ok(report)
}

/// In-place form of [`softmax`] for `f32` rows.
pub fn softmax_inplace(mut x: RowsMut<'_, f32>, temperature: f32) -> Result<Report, Error> {
    let inv_t = inv_temperature("temperature", 0, temperature)?;
    let mut report = Report::default();
    crate::simd::dispatch(
        #[inline(always)]
        || {
            for b in 0..x.rows() {
                let r = x.row_mut(b);
                let (_, s) = log_softmax_row_inplace(r, inv_t);
                if s == RowStatus::Ok {
                    exp_shift_inplace(r, 0.0);
                } else if s == RowStatus::Masked {
                    r.fill(0.0);
                }
                report.add(s);
            }
        },
    );
    Ok(report)
}

/// Replaces an `f32` row by its log-softmax at `1/inv_t`, following the edge
/// table of the module. Returns the row's log-sum-exp and status.
#[inline(always)]
pub(crate) fn log_softmax_row_inplace(r: &mut [f32], inv_t: f32) -> (f32, RowStatus) {
    let (max, log_sum, st) = log_softmax_row_inplace_parts(r, inv_t);
    (max * inv_t + log_sum, st)
}

/// [`log_softmax_row_inplace`] returning the log-sum-exp in parts: the raw
/// row maximum and `ln sum exp((x - max) / T)` (so callers can combine the
/// maximum with other terms before scaling, avoiding `inf - inf`).
#[inline(always)]
pub(crate) fn log_softmax_row_inplace_parts(r: &mut [f32], inv_t: f32) -> (f32, f32, RowStatus) {
    let (max, log_sum, st, _) = log_softmax_row_inplace_ent::<false>(r, inv_t);
    (max, log_sum, st)
}

/// [`log_softmax_row_inplace_parts`] that also returns the entropy (nats) of
/// the resulting distribution when `ENT` (NaN otherwise, and for rows that
/// are not [`RowStatus::Ok`]).
#[inline(always)]
pub(crate) fn log_softmax_row_inplace_ent<const ENT: bool>(
    r: &mut [f32],
    inv_t: f32,
) -> (f32, f32, RowStatus, f32) {
    let mut o = Online::EMPTY;
    let mut ent = 0.0f32;
    for c in r.chunks(TILE) {
        if ENT {
            o.push_ent(c, inv_t, &mut ent);
        } else {
            o.push(c, inv_t);
        }
        if o.bad {
            break;
        }
    }
    if o.bad {
        return match classify_bad::<f32>(r) {
            Bad::Nan => {
                r.fill(f32::NAN);
                (f32::NAN, f32::NAN, RowStatus::Nan, f32::NAN)
            }
            Bad::PosInf(k) => {
                let hit = -ln(k as f32);
                for v in r.iter_mut() {
                    *v = if *v == f32::INFINITY {
                        hit
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                // Uniform over the k tokens at +inf.
                (f32::INFINITY, 0.0, RowStatus::Ok, -hit)
            }
        };
    }
    if o.max == f32::NEG_INFINITY {
        r.fill(f32::NEG_INFINITY);
        return (f32::NEG_INFINITY, 0.0, RowStatus::Masked, f32::NAN);
    }
    let log_sum = o.log_sum();
    for v in r.iter_mut() {
        *v = (*v - o.max) * inv_t - log_sum;
    }
    let h = if ENT { log_sum - ent / o.sum } else { f32::NAN };
    (o.max, log_sum, RowStatus::Ok, h)
}
